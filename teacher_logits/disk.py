"""Disk space: how many bytes the shards will take, whether they fit, and a full
disk while writing as one line that says what to do.

The estimate serves the status command (the whole run, once ``prepare`` has
written its plan) and every generate job before it claims a GPU (its own shard);
the guard serves the writers. No torch.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskFullError
from .layout import RunLayout, partial_path
from .store.format import CHUNK_ROWS

VALUE_BYTES = {"float16": 2, "float32": 4}
# Per sample: one int64 sample id and one int64 offset.
SAMPLE_BYTES = 16
# HDF5 metadata, attributes (versions, claims) and checksums of one shard file.
FILE_OVERHEAD_BYTES = 64 * 1024


def uncompressed_bytes_per_token(top_k: int, value_dtype: str, store_entropy: bool) -> int:
    """Raw bytes of one token row: input id, k ids, k logits, logsumexp, entropy."""
    return 4 + top_k * 4 + top_k * VALUE_BYTES[value_dtype] + 4 + (2 if store_entropy else 0)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent, so it
    works before the folder exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def file_size_limit() -> float:
    """The largest file this process may write (ulimit -f), or infinity."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return float("inf") if soft == resource.RLIM_INFINITY else soft


def room_for(growing: Path) -> int:
    """Bytes ``growing``, a file being written, may still take: free disk, or less where a
    file-size limit leaves less."""
    size = growing.stat().st_size if growing.exists() else 0
    return int(min(free_bytes(growing.parent), file_size_limit() - size))


def finished_shard_sizes(layout: RunLayout, plan: dict) -> tuple[int, int]:
    """(bytes, tokens) over the shards already written: the compression this run really gets."""
    total_bytes = total_tokens = 0
    for shard in plan["shards"]:
        path = layout.shard(int(shard["index"]))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        total_bytes += size
        total_tokens += int(shard["num_tokens"])
    return total_bytes, total_tokens


@dataclass
class Estimate:
    bytes_per_token: float
    measured: bool  # from finished shards; else the uncompressed upper bound

    @property
    def basis(self) -> str:
        if self.measured:
            return "measured on the finished shards"
        return "upper bound before compression"

    def shard_bytes(self, num_tokens: int, num_samples: int) -> int:
        if self.measured:
            return int(num_tokens * self.bytes_per_token + num_samples * SAMPLE_BYTES)
        return int(
            allocated_rows(num_tokens) * self.bytes_per_token
            + num_samples * SAMPLE_BYTES
            + FILE_OVERHEAD_BYTES
        )


def allocated_rows(num_tokens: int) -> int:
    """Token rows HDF5 allocates: whole chunks, so the last one counts in full uncompressed."""
    chunk = max(1, min(CHUNK_ROWS, num_tokens))
    return -(-num_tokens // chunk) * chunk


def bytes_per_token(
    plan: dict, layout: RunLayout, value_dtype: str | None = None, store_entropy: bool | None = None
) -> Estimate:
    """Bytes per token: measured once a shard is finished, else the uncompressed size.

    Compression (zstd by default) typically stores a top-k row in well under half
    its raw size, but how much depends on the teacher; the first shard tells.
    """
    written, tokens = finished_shard_sizes(layout, plan)
    if tokens:
        return Estimate(written / tokens, measured=True)
    settings = plan.get("settings", {})
    if value_dtype is None:
        value_dtype = settings.get("storage", {}).get("value_dtype", "float32")
    if store_entropy is None:
        store_entropy = settings.get("generation", {}).get("store_entropy", True)
    raw = uncompressed_bytes_per_token(int(plan["top_k"]), value_dtype, bool(store_entropy))
    if "loss_mask" in plan:  # chat data: one uint8 per token more
        raw += 1
    return Estimate(float(raw), measured=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover - the loop returns at TB


def check_shard_fits(
    layout: RunLayout, plan: dict, shard: int, value_dtype: str, store_entropy: bool
) -> None:
    """Refuse to start a shard whose file cannot fit in the free space of its folder."""
    output = layout.shard(shard)
    entry = plan["shards"][shard]
    estimate = bytes_per_token(plan, layout, value_dtype, store_entropy)
    needed = estimate.shard_bytes(int(entry["num_tokens"]), int(entry["num_samples"]))
    free = free_bytes(output.parent)
    partial = partial_path(output)
    if partial.exists():  # a killed attempt's file is overwritten: its space counts as free
        free += partial.stat().st_size
    if needed > free:
        raise DiskFullError(
            f"disk full: shard {shard} needs about {human_bytes(needed)} ({needed} bytes, "
            f"{estimate.basis}) but only {human_bytes(free)} ({free} bytes) are free under "
            f"{output.parent}; free some space or point output_dir at a bigger disk, then rerun"
        )


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# libhdf5 reports a failed write through h5py with the OS error only in its message.
DISK_FULL_WORDS = ("No space left", "Disk quota", "File too large", "errno = 28", "errno = 27")


def disk_full(path: Path, needed: int | None = None) -> DiskFullError:
    free = min(free_bytes(path.parent), file_size_limit()) / 2**20
    need = f"it needs up to {needed / 2**20:.0f} MiB, " if needed else ""
    return DiskFullError(
        f"disk full while writing {path}: {need}{free:.0f} MiB free there; free space or move "
        "output_dir, then rerun the same command (committed parts and finished shards are kept)"
    )


@contextmanager
def disk_full_is_a_user_error(path: Path):
    """Turn a full disk (or a file-size limit) into one line that says what to do."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS) or any(
            word in str(exc) for word in DISK_FULL_WORDS
        )
        if not full:
            raise
        raise disk_full(path) from None
