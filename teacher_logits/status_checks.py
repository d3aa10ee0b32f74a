"""``status``'s quick check of finished shards, and where it keeps what it found.

The check runs in worker processes (a libhdf5 crash on a corrupt file costs a worker,
not status), and only where a shard's file changed since the last status: results are
kept by size, mtime, ctime and inode (ctime moves with any write or ``touch``, so a
truncated shard whose mtime was put back is checked again).

Status never writes into a store: the results go with the run's own state when it is
there and writable, else into the user's cache folder, else nowhere (``cache_path``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ShardError
from .fingerprints import stat_key
from .json_cache import has_fields, load_cache, mapping_of, save_cache
from .layout import RunLayout
from .store.identity import FINGERPRINTS, identity_mismatch
from .store.isolated import check_batched
from .store.validate import quick_check

# Provenance a finished shard's attributes give the table and the speed figures.
PROVENANCE_KEYS = (
    "cuda_visible_devices",
    "hostname",
    "started_at",
    "finished_at",
    "claims",
    "generation_seconds",
    "teacher_load_seconds",
)


def cache_path(layout: RunLayout) -> Path | None:
    """Where this status keeps its results: the run's state folder when it exists and can
    be written, else the user's cache folder, else nowhere (a read-only home)."""
    state = layout.status_checks.parent
    if state.is_dir() and os.access(state, os.W_OK):
        return layout.status_checks
    path = layout.user_status_checks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def _entry_ok(index: str, entry) -> bool:
    return (
        index.isdigit()
        and isinstance(entry, dict)
        and isinstance(entry.get("key"), (str, type(None)))
        and isinstance(entry.get("result"), (dict, str))
    )


def _cache_ok(data) -> bool:
    return has_fields(data, expected=dict, shards=dict) and mapping_of(_entry_ok)(data["shards"])


def check_finished(layout: RunLayout, plan: dict, indexes: list[int]) -> dict:
    """Quick-check finished shards of ``plan`` (a plan, or a manifest: its ``shards``
    entries with their index and counts): per shard its provenance, or why it fails (a str)."""
    expected = {k: plan[k] for k in ("top_k", *FINGERPRINTS) if k in plan}
    entries = {int(entry["index"]): entry for entry in plan["shards"]}
    path = cache_path(layout)
    cache = load_cache(path, _cache_ok) or {}
    known = cache["shards"] if cache.get("expected") == expected else {}
    keys = {index: shard_stat_key(layout.shard(index)) for index in indexes}
    results = {
        index: known[str(index)]["result"]
        for index in indexes
        if str(index) in known and known[str(index)]["key"] == keys[index]
    }

    def check(index: int) -> dict:
        entry = entries[index]
        attrs = quick_check(layout.shard(index), entry["num_samples"], entry["num_tokens"])
        wrong = identity_mismatch(attrs, {**expected, "shard_index": index})
        if wrong:
            raise ShardError(f"is not this run's shard {index} ({'; '.join(wrong)})")
        return {key: attrs.get(key) for key in PROVENANCE_KEYS}

    todo = [index for index in indexes if index not in results]
    if todo:
        for r in check_batched(check, todo):
            results[r.item] = r.value if r.error is None else r.error
        shards = {str(i): {"key": keys[i], "result": results[i]} for i in indexes if keys[i]}
        # A read-only or full disk only costs the next status its speed.
        save_cache(path, {"expected": expected, "shards": shards})
    return results


def shard_stat_key(path: Path) -> str | None:
    try:
        return stat_key(path)
    except OSError:
        return None
