"""One Snakemake run per ``output_dir`` at a time, without Snakemake's own lock.

Snakemake's lock files outlive a ``kill -9`` and then demand ``--unlock``. This lock
is an fcntl lock held by the running Snakemake process: the kernel drops it when
that process dies, however it dies, so the same command simply runs again.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .layout import RunLayout
from .locks import OUTPUT_DIR_FIX, holder_line, try_lock

_held = []  # keeps the lock's file open for the life of the process


def hold_run_lock(output_dir: str | os.PathLike) -> Path:
    """Take the run lock of ``output_dir`` or raise ``ConfigError`` naming who holds it
    (``LockError`` when flock fails there in another way)."""
    path = RunLayout(output_dir).run_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        taken = try_lock(handle, path, OUTPUT_DIR_FIX)
    except BaseException:
        handle.close()
        raise
    if not taken:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"another Snakemake run ({holder}) is working on output_dir {output_dir}; "
            "wait for it to finish or stop it, or use another output_dir"
        )
    handle.seek(0)
    handle.truncate()
    handle.write(holder_line() + "\n")
    handle.flush()
    _held.append(handle)
    return path
