"""Make Snakemake redo what changed by content: outputs dated back, nothing else.

A shard truncated or overwritten after its job finished, with its timestamp kept
(``rsync -a``, ``cp -p``, a restore), looks finished to Snakemake. Its job records
the size it wrote; at plan time a shard of another size is dated back to 1970, so
Snakemake runs its job again, which validates what is there and regenerates it.
The plan is dated back the same way when the run's inputs changed by content
(``run_inputs.changes_since_plan``). Plain Python: this runs while Snakemake plans.
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


# The date given to an output Snakemake must make again (0 would read as "no date").
OUTDATED = 1


def date_back(layout: RunLayout, plan_outdated: bool, num_shards: int) -> list[str]:
    """Date back the plan when it is outdated (or give it its date back when it no longer
    is, after a dry run with other settings) and every damaged shard; one line per shard."""
    try:
        plan_mtime = layout.plan.stat().st_mtime
        if plan_outdated and plan_mtime != OUTDATED:
            os.utime(layout.plan, (OUTDATED, OUTDATED))
        elif not plan_outdated and plan_mtime == OUTDATED:
            written = layout.tokens.stat().st_mtime_ns  # written with it
            os.utime(layout.plan, ns=(written, written))
    except FileNotFoundError:
        # No plan: a first run, or a prepare that failed after Snakemake deleted its
        # outputs. Snakemake would leave finished shards be (nothing needs the missing
        # plan), so every shard is checked against the plan prepare makes next.
        for index in range(num_shards):
            if layout.shard(index).exists():
                os.utime(layout.shard(index), (OUTDATED, OUTDATED))
    damaged = damaged_shards(layout, num_shards)
    for index in damaged:
        os.utime(layout.shard(index), (OUTDATED, OUTDATED))
    return list(damaged.values())


def damaged_shards(layout: RunLayout, num_shards: int) -> dict[int, str]:
    """Every finished shard whose size is not what its job wrote: index -> one line why."""
    damaged = {}
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
            damaged[index] = (
                f"shard {index}: {shard} is {size:,} bytes but its job wrote {expected:,} "
                "(truncated or overwritten since): it will be validated and regenerated"
            )
    return damaged
