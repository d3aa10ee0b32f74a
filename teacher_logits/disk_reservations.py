"""The disk room running generate jobs have claimed and not yet written.

Two shards starting together see the same free space, and each may fit alone where
only one of them fits. So ``disk.check_shard_fits`` compares and records under one
exclusive flock on a small ledger beside the shards, taking off what the other running
jobs have reserved and not yet written.

A reservation lives as long as its shard's job lock (``shards/shard_N.lock``, held by
the job for its whole life): the kernel drops that lock when the job ends, normally,
by an error or by ``kill -9``, and an entry whose lock is free counts for nothing and
is dropped at the next check. A reservation shrinks as its job writes: it counts the
bytes reserved less what the shard, its ``.partial`` file and its resume parts have
grown by since, because what is written is already gone from the free space.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LockError
from .json_cache import has_fields, load_cache, mapping_of
from .layout import RunLayout, atomic_write_text, partial_path
from .locks import OUTPUT_DIR_FIX, held_by_another, holder_line, try_lock

# A check holds the ledger for a few stat calls; one held this long is stopped or hung.
LEDGER_WAIT_S = 60.0
LEDGER_POLL_S = 0.05


def written_bytes(layout: RunLayout, shard: int, with_partial: bool = True) -> int:
    """Bytes of the shard's files on disk: the shard, its ``.partial`` file and its resume
    parts (the parts folder keeps a hard link to the finished shard: counted once)."""
    paths = [layout.shard(shard)] + ([partial_path(layout.shard(shard))] if with_partial else [])
    try:
        paths += list(layout.parts_dir(shard).iterdir())
    except FileNotFoundError:
        pass
    seen, total = set(), 0
    for path in paths:
        try:
            info = path.stat()
        except FileNotFoundError:  # a part renamed or deleted while we list
            continue
        if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_size
    return total


def job_running(layout: RunLayout, shard: int) -> bool:
    """Whether a generate job holds the shard's lock; counted as running where flock
    cannot tell, so that the check errs towards refusing."""
    try:
        return held_by_another(layout.shard_lock(shard))
    except LockError:
        return True


@dataclass
class Ledger:
    """The reservations of one shards folder, read while its lock is held."""

    layout: RunLayout
    entries: dict[str, dict]

    def reserved_by_others(self, shard: int) -> dict[int, int]:
        """Bytes each other running job has reserved and not yet written, by shard."""
        left = {}
        for key, entry in self.entries.items():
            other = int(key)
            if other == shard or not job_running(self.layout, other):
                continue
            grown = written_bytes(self.layout, other) - entry["baseline"]
            left[other] = min(entry["bytes"], max(0, entry["bytes"] - grown))
        return left

    def record(self, shard: int, needed: int, running: dict[int, int]) -> None:
        """Reserve ``needed`` bytes for ``shard``'s job; keep only the entries of ``running``.

        A killed attempt's ``.partial`` file is overwritten (the caller counted it as free
        room), so it is left out of the size the reservation shrinks from.
        """
        entries = {str(other): self.entries[str(other)] for other in running}
        entries[str(shard)] = {
            "bytes": int(needed),
            "baseline": written_bytes(self.layout, shard, with_partial=False),
            "holder": holder_line(),
            "at": time.time(),
        }
        atomic_write_text(self.layout.disk_ledger, json.dumps(entries, indent=1))


@contextmanager
def room_ledger(layout: RunLayout) -> Iterator[Ledger]:
    """Hold the ledger of ``layout``'s shards folder while the caller compares and records."""
    folder = layout.shards_dir
    folder.mkdir(parents=True, exist_ok=True)
    lock = layout.disk_ledger_lock
    with open(lock, "a+") as handle:  # closing releases the lock
        deadline, holder = time.monotonic() + LEDGER_WAIT_S, None
        while not try_lock(handle, lock, OUTPUT_DIR_FIX):
            handle.seek(0)
            now_held_by = handle.read()
            if now_held_by != holder:  # others' checks go on: a queue of them, not a hang
                deadline, holder = time.monotonic() + LEDGER_WAIT_S, now_held_by
            if time.monotonic() > deadline:
                handle.seek(0)
                raise LockError(
                    f"{lock} has been held for over {LEDGER_WAIT_S:.0f} s by "
                    f"{handle.read().strip() or 'another job'}, though a disk check takes "
                    "milliseconds: that process is stopped or hung; end it, then rerun"
                )
            time.sleep(LEDGER_POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(holder_line() + "\n")
        handle.flush()
        yield Ledger(layout, read_entries(layout.disk_ledger))


def _entry_ok(shard: str, entry) -> bool:
    return shard.isdigit() and has_fields(entry, bytes=int, baseline=int)


def read_entries(path: Path) -> dict[str, dict]:
    """The reservations on record; none when the ledger is missing or damaged (it only
    sharpens the disk check, and is rewritten by the next job that starts)."""
    return load_cache(path, mapping_of(_entry_ok)) or {}
