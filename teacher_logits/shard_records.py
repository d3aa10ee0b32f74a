"""What a finished shard looked like when its job wrote it, checked at plan time.

A shard truncated or overwritten after its job finished, with its timestamp kept
(``rsync -a``, ``cp -p``, a restore), looks finished to Snakemake. Its job records
the size it wrote; at plan time a shard of another size is dated back to 1970, so
Snakemake runs its job again, which validates what is there and regenerates it.
Plain Python: this runs while Snakemake plans.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .layout import PARTS_ASSEMBLED_RECORD, RunLayout, atomic_write_text, parts_dir_for


def record_written_shard(shard_path: str | os.PathLike) -> None:
    """Remember the finished shard's size beside its kept copy (see ``CommittedParts``)."""
    record = parts_dir_for(shard_path) / PARTS_ASSEMBLED_RECORD
    atomic_write_text(record, json.dumps({"bytes": Path(shard_path).stat().st_size}))


def written_size(shard_path: str | os.PathLike) -> int | None:
    try:
        record = parts_dir_for(shard_path) / PARTS_ASSEMBLED_RECORD
        return int(json.loads(record.read_text())["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def flag_damaged_shards(layout: RunLayout, num_shards: int) -> list[str]:
    """Date back every finished shard whose size is not what its job wrote; one line each."""
    lines = []
    for index in range(num_shards):
        shard = layout.shard(index)
        expected = written_size(shard)
        if expected is None:
            continue
        try:
            size = shard.stat().st_size
        except OSError:
            continue  # missing: Snakemake regenerates it anyway
        if size != expected:
            os.utime(shard, (1, 1))  # (0 reads as "no date" to Snakemake)
            lines.append(
                f"shard {index}: {shard} is {size:,} bytes but its job wrote {expected:,} "
                "(truncated or overwritten since): it will be validated and regenerated"
            )
    return lines
