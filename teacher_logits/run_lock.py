"""One Snakemake run per ``output_dir`` at a time, without Snakemake's own lock.

Snakemake's lock files outlive a ``kill -9`` and then demand ``--unlock``. This lock
is an fcntl lock held by the running Snakemake process: the kernel drops it when
that process dies, however it dies, so the same command simply runs again.

A holder that is alive but no longer working (Snakemake can hang in its own SIGTERM
handler) keeps the lock until it is killed, so whoever finds the lock held is told
the holder's pid, how long it has held the lock, whether any job of the run is
running, and the command that frees it (``holder_info``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, LockError
from .layout import RunLayout, job_record_for, shard_index_of
from .locks import OUTPUT_DIR_FIX, held_by_another, holder_line, try_lock
from .run_stats import duration

_held = []  # keeps the lock's file open for the life of the process
# What the lock file says of its holder: ``holder_line()`` and since when.
_HOLDER = re.compile(r"pid (\d+) on (\S+)(?: since ([\d.]+))?")


def hold_run_lock(output_dir: str | os.PathLike) -> Path:
    """Take the run lock of ``output_dir`` for the life of this process, or raise
    ``ConfigError`` naming who holds it (``LockError`` when flock fails there in another way)."""
    _held.append(_take(output_dir))
    return RunLayout(output_dir).run_lock


@contextmanager
def run_lock_held(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run lock of ``output_dir`` while the caller changes the run's files."""
    handle = _take(output_dir)
    try:
        yield RunLayout(output_dir).run_lock
    finally:
        handle.close()  # closing releases the lock


def _take(output_dir: str | os.PathLike):
    layout = RunLayout(output_dir)
    path = layout.run_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        taken = try_lock(handle, path, OUTPUT_DIR_FIX)
    except BaseException:
        handle.close()
        raise
    if not taken:
        handle.close()
        info = holder_info(layout) or {"holder": "another process", "free": "stopping it"}
        raise ConfigError(
            f"another Snakemake run ({info['holder']}) is working on output_dir {output_dir}; "
            f"wait for it to finish, or if it is stuck free the lock with {info['free']}, "
            "or use another output_dir"
        )
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder_line()} since {time.time():.0f}\n")
    handle.flush()
    return handle


def holder_info(layout: RunLayout, now: float | None = None) -> dict | None:
    """Who holds the run lock of ``layout`` (None when nobody does): ``pid``, ``host``,
    ``held_seconds``, what the run is ``doing``, the ``free`` command, and all of it as
    one ``holder`` phrase."""
    try:
        if not held_by_another(layout.run_lock):
            return None
        text = layout.run_lock.read_text().strip()
    except (LockError, OSError):
        return None
    now = time.time() if now is None else now
    match = _HOLDER.match(text)
    pid, host, since = match.groups() if match else (None, None, None)
    held = now - float(since) if since else None
    doing = run_activity(layout)
    if pid is None:
        free = "stopping the process that holds it (`fuser` names it)"
    else:
        where = "" if host == socket.gethostname() else f" on {host}"
        free = f"`kill {pid}`{where} (`kill -9 {pid}` if it ignores SIGTERM)"
    described = f"pid {pid} on {host}" if pid else text or "another process"
    if held is not None:
        described += f", holding the lock for {duration(held)}"
    # ``holder``: all of it as one phrase, for messages.
    return {
        "pid": int(pid) if pid else None,
        "host": host,
        "held_seconds": held,
        "doing": doing,
        "free": free,
        "holder": f"{described}; {doing}",
    }


def run_activity(layout: RunLayout) -> str:
    """Which jobs of the run are working, as far as their locks and records tell."""
    try:
        names = [p.name for p in layout.shards_dir.iterdir() if p.suffix == ".lock"]
    except OSError:
        names = []
    shards = sorted(i for i in map(shard_index_of, names) if i is not None)
    running = [i for i in shards if _probe(layout.shard_lock(i))]
    gather = _live_job(job_record_for(layout.log("gather")))
    if running:
        listed = ", ".join(map(str, running[:8])) + (", ..." if len(running) > 8 else "")
        return f"generate jobs are running on shards {listed}"
    if gather:
        return f"gather is running (pid {gather})"
    return "no job of the run is running: no shard lock is held and no gather is alive"


def _probe(path: Path) -> bool:
    try:
        return held_by_another(path)
    except LockError:
        return False


def _live_job(record_path: Path) -> int | None:
    """The pid of a job whose record says it is running, if that process is alive here."""
    try:
        record = json.loads(record_path.read_text())
        pid = int(record["pid"]) if record.get("state") == "running" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if pid is None or record.get("hostname") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return pid
