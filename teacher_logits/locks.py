"""Every flock the workflow takes, and how a failing one is reported.

GPU claims, the run lock, each shard's job lock and the disk-room ledger are flocks
because the kernel drops one when its holder dies, however it dies. "Held by someone
else" is the only failure the callers expect. On network filesystems flock can fail
in other ways (ENOLCK on NFS without a lock daemon, ENOSYS on Lustre mounted without
``flock``, EOPNOTSUPP or EINVAL on other mounts without lock support, EACCES, EIO);
those become one ``LockError`` line naming the lock, the OS error and where the lock
has to live instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import LockError

OUTPUT_DIR_FIX = (
    "put output_dir on a filesystem where flock works across the machines that run jobs "
    "(a local disk, or NFS v4 / Lustre mounted with flock support), then rerun"
)


def holder_line() -> str:
    """Who holds a lock, as written into its file for the messages of those who wait."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def lock_error(path: str | os.PathLike, exc: OSError, fix: str) -> LockError:
    """The one line for a lock that failed with ``exc``, an error other than "held"."""
    code = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    reason = exc.strerror or str(exc)
    return LockError(
        f"cannot take the lock {path}: flock failed there with '{reason}' ({code}); {fix}"
    )


def try_lock(handle, path: str | os.PathLike, fix: str, shared: bool = False) -> bool:
    """Take a non-blocking flock on ``handle`` (an open file or a descriptor of ``path``).

    True when taken, False when another holder has it; any other failure raises
    ``LockError`` with ``fix``.
    """
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise lock_error(path, exc, fix) from exc
    return True


def held_by_another(path: Path) -> bool:
    """Whether some process holds an exclusive flock on ``path`` (a missing file: no).

    The probe is a shared lock, released at once: it conflicts with a job's exclusive
    lock but not with another probe. ``LockError`` when the filesystem cannot tell.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise lock_error(path, exc, OUTPUT_DIR_FIX) from exc
    try:
        if not try_lock(fd, path, OUTPUT_DIR_FIX, shared=True):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
