"""Make Snakemake redo what changed by content: timestamps moved, nothing else.

A segment's plan is dated back to 1970 when the run's inputs changed by content
(``shard_plan.plan_shards``), so Snakemake prepares that segment again. A shard truncated
or overwritten after its job finished, with its timestamp kept (``rsync -a``,
``cp -p``, a restore), looks finished to Snakemake: its job records the size it
wrote, and at plan time a shard of another size is dated forward, so gather checks
it again and names it. Plain Python: this runs while Snakemake plans.
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


def date_back(
    layout: RunLayout, outdated: set[int], num_shards: int, segments: int = 1
) -> list[str]:
    """Date back the plans of the ``outdated`` segments (and give a plan its date back when
    it no longer is, after a dry run with other settings) and every damaged shard; one
    line per shard."""
    for segment in range(segments):
        plan = layout.segment_plan(segment)
        try:
            plan_mtime = plan.stat().st_mtime
            if segment in outdated and plan_mtime != OUTDATED:
                os.utime(plan, (OUTDATED, OUTDATED))
            elif segment not in outdated and plan_mtime == OUTDATED:
                written = layout.segment_tokens(segment).stat().st_mtime_ns  # written with it
                os.utime(plan, ns=(written, written))
        except FileNotFoundError:
            pass  # no plan: the workflow's target asks for one, so prepare runs
    damaged = damaged_shards(layout, num_shards)
    for index in damaged:
        # Dated forward, not back: Snakemake skips a job whose small inputs keep the
        # checksums it recorded, however old its output; a newer shard makes gather
        # validate it again, and gather names it with the command that regenerates it.
        os.utime(layout.shard(index))
    return list(damaged.values())


def gathered_sizes(layout: RunLayout) -> dict[int, int]:
    """Shard sizes the last gather recorded: one file to read instead of one per shard."""
    try:
        manifest = json.loads(layout.manifest.read_text())
        return {int(entry["index"]): int(entry["bytes"]) for entry in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def damaged_shards(layout: RunLayout, num_shards: int) -> dict[int, str]:
    """Every finished shard whose size is not what its job wrote: index -> one line why.
    A stat per shard; a shard's own record is read only where the manifest's size differs."""
    gathered = gathered_sizes(layout)
    damaged = {}
    for index in range(num_shards):
        shard = layout.shard(index)
        try:
            size = shard.stat().st_size
        except OSError:
            continue  # missing: Snakemake regenerates it anyway
        if gathered.get(index) == size:
            continue
        expected = written_size(shard)
        if expected is not None and size != expected:
            damaged[index] = (
                f"shard {index}: {shard} is {size:,} bytes but its job wrote {expected:,} "
                "(truncated or overwritten since): gather checks it again"
            )
    return damaged
