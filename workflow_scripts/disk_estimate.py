"""How many bytes the shards will take, and whether they fit on the disk.

Used by the status command (the whole run, once ``prepare`` has written its plan)
and by every generate job before it claims a GPU (its own shard). No torch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.shard_format import CHUNK_ROWS

VALUE_BYTES = {"float16": 2, "float32": 4}
# Per sample: one int64 sample id and one int64 offset.
SAMPLE_BYTES = 16
# HDF5 metadata, attributes (versions, claims) and checksums of one shard file.
FILE_OVERHEAD_BYTES = 64 * 1024


def uncompressed_bytes_per_token(top_k: int, value_dtype: str, store_entropy: bool) -> int:
    """Raw bytes of one token row: input id, k ids, k logits, logsumexp, entropy."""
    return 4 + top_k * 4 + top_k * VALUE_BYTES[value_dtype] + 4 + (2 if store_entropy else 0)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding ``path`` (or its nearest
    existing parent, so it works before the folder exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def finished_shard_sizes(shards_dir: Path, plan: dict) -> tuple[int, int]:
    """(bytes, tokens) over the shards already written: the compression this run really gets."""
    total_bytes = total_tokens = 0
    for shard in plan["shards"]:
        path = shards_dir / f"shard_{shard['index']:05d}.h5"
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
        return int(allocated_rows(num_tokens) * self.bytes_per_token + num_samples * SAMPLE_BYTES
                   + FILE_OVERHEAD_BYTES)


def allocated_rows(num_tokens: int) -> int:
    """Token rows HDF5 allocates: whole chunks, so the last one counts in full uncompressed."""
    chunk = max(1, min(CHUNK_ROWS, num_tokens))
    return -(-num_tokens // chunk) * chunk


def bytes_per_token(plan: dict, shards_dir: Path, value_dtype: str | None = None,
                    store_entropy: bool | None = None) -> Estimate:
    """Bytes per token: measured once a shard is finished, else the uncompressed size.

    Compression (zstd by default) typically stores a top-k row in well under half
    its raw size, but how much depends on the teacher; the first shard tells.
    """
    written, tokens = finished_shard_sizes(shards_dir, plan)
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


def check_shard_fits(config: dict, plan: dict, shard: int, output: str | os.PathLike) -> None:
    """Refuse to start a shard whose file cannot fit in the free space of its folder."""
    from workflow_scripts.job import UserError

    output = Path(output)
    entry = plan["shards"][shard]
    estimate = bytes_per_token(
        plan, output.parent, config["storage"]["value_dtype"], config["generation"]["store_entropy"]
    )
    needed = estimate.shard_bytes(int(entry["num_tokens"]), int(entry["num_samples"]))
    free = free_bytes(output.parent)
    partial = output.with_name(output.name + ".partial")
    if partial.exists():  # a killed attempt's file is overwritten: its space counts as free
        free += partial.stat().st_size
    if needed > free:
        raise UserError(
            f"disk full: shard {shard} needs about {human_bytes(needed)} ({needed} bytes, "
            f"{estimate.basis}) but only {human_bytes(free)} ({free} bytes) are free under "
            f"{output.parent}; free some space or point output_dir at a bigger disk, then rerun"
        )
