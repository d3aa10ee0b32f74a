"""What every rule script shares: logging to the job's log file and the console,
offline mode, and turning a user error into one clear line instead of a traceback.

A rule script is ``run_job(name, snakemake.log[0], main, settings, ...)``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback

from .errors import UserError
from .layout import atomic_write_text, job_record_for

# Never reach for a hub: the workflow only reads local models and data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def setup_logging(log_path: str | None, name: str) -> logging.Logger:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        file_handler = logging.FileHandler(log_path, mode="w")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    # The console shows warnings and errors: a user error must reach where the user looks.
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter(f"[{name}] %(levelname)s: %(message)s"))
    root.addHandler(console)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(name)


def write_job_record(log_path: str | os.PathLike | None, record: dict) -> None:
    """The job's state beside its log, for ``status``: started, done or failed (and why)."""
    if not log_path:
        return
    path = job_record_for(log_path)
    try:
        atomic_write_text(path, json.dumps(record))
    except OSError as exc:  # a full disk must not fail a job, or hide its own error
        logging.getLogger(__name__).warning("could not write %s (%s)", path, exc)


def run_job(name: str, log_path: str | None, main, *args, **kwargs):
    """Run ``main`` with logging set up; user errors exit 1 with one line.

    Beside the log it keeps a small record of the job's state (``job_record_for``):
    ``running`` from the start, then ``done`` or ``failed`` with the error line. A
    killed job leaves ``running`` behind; ``status`` tells it from a live one by
    the lock a working job holds.
    """
    log = setup_logging(log_path, name)
    record = {
        "job": name,
        "state": "running",
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "started_at": time.time(),
    }
    write_job_record(log_path, record)
    try:
        result = main(*args, **kwargs)
    except UserError as exc:
        log.error("%s", exc)
        write_job_record(
            log_path, {**record, "state": "failed", "finished_at": time.time(), "error": str(exc)}
        )
        sys.exit(1)
    except Exception as exc:
        # Python prints the traceback on the console; keep a copy in the job's log too.
        if log_path:
            with open(log_path, "a") as handle:
                traceback.print_exc(file=handle)
        error = " ".join(f"{type(exc).__name__}: {exc}".split())
        write_job_record(
            log_path, {**record, "state": "failed", "finished_at": time.time(), "error": error}
        )
        raise
    write_job_record(log_path, {**record, "state": "done", "finished_at": time.time()})
    return result
