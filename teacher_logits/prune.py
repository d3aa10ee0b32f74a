"""Shards that no plan owns any more: ``python -m teacher_logits.prune OUTPUT_DIR [--yes]``.

A plan made again from scratch (the last file dropped from ``dataset.path``, say) can
have fewer shards than the one before; the old plan's shard files, their resume parts
and kept copies (``shards/shard_N.parts/``) and their job locks stay on disk, since
nothing is ever deleted behind the user's back. A shard is owned when the current plan
or the gathered store's ``manifest.json`` lists it. ``status`` reports the others with
their size; this command lists them, and removes them only with ``--yes``, and never
while a run holds the run lock. No Snakemake, torch or HDF5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .disk import human_bytes
from .errors import ConfigError
from .layout import RunLayout, shard_index_of
from .run_lock import run_lock_held
from .shard_plan import load_plan


@dataclass
class Orphans:
    """The entries under ``shards/`` of shards nobody owns, and the bytes they hold."""

    paths: list[Path] = field(default_factory=list)
    shards: list[int] = field(default_factory=list)
    bytes: int = 0

    def summary(self) -> dict:
        return {"shards": self.shards, "paths": len(self.paths), "bytes": self.bytes}


def owned_shards(layout: RunLayout) -> set[int] | None:
    """Shards the plan or the gathered store lists; None when there is neither (nothing
    then says which shards belong, so none counts as orphaned)."""
    owned, known = set(), False
    try:
        owned |= {int(entry["index"]) for entry in load_plan(layout)["shards"]}
        known = True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        manifest = json.loads(layout.manifest.read_text())
        owned |= {int(entry["index"]) for entry in manifest["shards"]}
        known = True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return owned if known else None


def find_orphans(layout: RunLayout) -> Orphans:
    orphans = Orphans()
    owned = owned_shards(layout)
    if owned is None:
        return orphans
    try:
        entries = sorted(layout.shards_dir.iterdir())
    except OSError:
        return orphans
    seen: set[tuple[int, int]] = set()  # a kept copy is a hard link to its shard: count once
    for path in entries:
        index = shard_index_of(path.name)
        if index is None or index in owned:
            continue
        orphans.paths.append(path)
        if index not in orphans.shards:
            orphans.shards.append(index)
        for file in [path, *path.rglob("*")] if path.is_dir() else [path]:
            try:
                info = file.lstat()
            except OSError:
                continue
            if file.is_file() and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                orphans.bytes += info.st_size
    return orphans


def orphans_line(summary: dict, output_dir: str) -> str:
    """What status says of them (``Orphans.summary``), with the command that removes them."""
    shards = summary["shards"]
    listed = ", ".join(map(str, shards[:8])) + (", ..." if len(shards) > 8 else "")
    return (
        f"  {len(shards)} shard(s) no plan owns any more ({listed}): {summary['paths']} "
        f"files or folders, {human_bytes(summary['bytes'])}; "
        f"`teacher-logits prune {output_dir}` lists them, `--yes` removes them"
    )


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None, prog: str = "python -m teacher_logits.prune") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="List (and with --yes remove) shard files, resume parts and kept copies "
        "that no plan of the run owns any more.",
    )
    parser.add_argument("output_dir", help="the run's output_dir (e.g. results/demo)")
    parser.add_argument("--yes", action="store_true", help="remove them (default: only list)")
    args = parser.parse_args(argv)
    layout = RunLayout(args.output_dir)
    if not layout.output_dir.is_dir():
        print(f"prune: {args.output_dir} does not exist; give the run's output_dir")
        return 1
    try:
        with run_lock_held(args.output_dir):
            if owned_shards(layout) is None:
                print(
                    f"prune: {args.output_dir} has no shard plan and no manifest.json, so "
                    "nothing says which shards belong to it; run the workflow first"
                )
                return 1
            orphans = find_orphans(layout)
            if not orphans.paths:
                print(f"nothing to prune: every shard under {layout.shards_dir} has a plan")
                return 0
            listed = [f"{path}{'/' if path.is_dir() else ''}" for path in orphans.paths]
            if args.yes:
                remove(orphans.paths)
            for line in listed:
                print(f"{'removed' if args.yes else 'would remove'} {line}")
    except ConfigError as error:  # the run lock is held (or cannot be taken here)
        print(f"prune: {error}")
        return 1
    total = f"{len(orphans.shards)} orphaned shard(s), {human_bytes(orphans.bytes)}"
    print(f"{total} freed" if args.yes else f"{total}; run again with --yes to remove them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
