"""What every rule script shares: logging to the job's log file and the console,
offline mode, and turning a user error into one clear line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

# Never reach for a hub: the workflow only reads local models and data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .gpu_groups import GpuConfigError  # noqa: E402
from .shard_format import ShardError  # noqa: E402
from .workflow_config import ConfigError  # noqa: E402


class UserError(RuntimeError):
    """A problem the user fixes (bad input, missing file); the message names the fix."""


USER_ERRORS = (UserError, ConfigError, GpuConfigError, ShardError)


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


def run_job(name: str, log_path: str | None, main, *args, **kwargs):
    """Run ``main`` with logging set up; user errors exit 1 with one line."""
    log = setup_logging(log_path, name)
    try:
        return main(*args, **kwargs)
    except USER_ERRORS as exc:
        log.error("%s", exc)
        sys.exit(1)
    except Exception:
        # Python prints the traceback on the console; keep a copy in the job's log too.
        if log_path:
            with open(log_path, "a") as handle:
                traceback.print_exc(file=handle)
        raise
