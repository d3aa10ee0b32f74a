"""Gather's record of the shards it has checked, so a rerun checks only new or changed ones.

A shard's entry holds what its check found (``ShardSummary`` less the sample arrays,
which are prepare's), its sha256 and size, under two keys:

- the file's identity: size, ``mtime_ns`` and inode, taken before the check read it.
  Like ``make``, the cache trusts these: a shard written again (generate renames a new
  file into place: a new inode) or edited in place (a new mtime) is checked again; a
  file whose bytes were changed with its size and mtime put back is not.
- what it was checked against: the attributes it must carry, the plan's entry for it,
  prepare's tokens file, the vocabulary, temperatures and the code's format and check
  versions, hashed together. A change to any of them checks the shard again.

The head never opens a shard to look it up (a stat only): libhdf5 may crash on a corrupt
file, which only the isolated workers may risk. A missing, unreadable or damaged cache
file means "check everything", never an error (``json_cache``); it is written atomically. Needs the standard library and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ShardError
from ..json_cache import has_fields, load_cache, mapping_of, save_cache
from .format import FORMAT_VERSION
from .stats import ShardStats
from .validate import ShardSummary

log = logging.getLogger("gather")

# Raised whenever validation starts checking something it did not: entries made by an
# older check are then checked again.
CHECKS_VERSION = 1
# Bytes hashed between two progress reports (well under a second of reading).
HASH_BLOCK = 1 << 22


def file_identity(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime_ns, inode, ctime_ns] of the file, or None when it cannot be stat'ed.

    ctime because no one can set it back: a file edited in place or copied over with
    ``cp -p`` (same inode, mtime put back) still moves it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def expectation_key(expected: dict) -> str:
    """One digest of everything a shard is checked against (JSON-able values)."""
    text = json.dumps(
        {"expected": expected, "format": FORMAT_VERSION, "checks": CHECKS_VERSION},
        sort_keys=True,
        default=_jsonable,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def hash_unchanged(path: str | os.PathLike, identity: list[int] | None, progress) -> str:
    """The file's sha256, read in the worker that just checked it; ``ShardError`` if it is
    no longer the file ``identity`` describes (replaced while it was being checked)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        if identity != [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]:
            raise ShardError("the file changed while gather checked it; run gather again")
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            progress()
    return digest.hexdigest()


class ValidationCache:
    """Entries by shard index, loaded from and saved to ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._changed = False
        data = load_cache(self.path, _cache_ok) or {}
        ok = data.get("version") == CHECKS_VERSION
        self.entries: dict[str, dict] = data["shards"] if ok else {}

    def lookup(
        self, index: int, identity, expects: str, sample_ids, offsets
    ) -> ShardSummary | None:
        """The cached summary of shard ``index`` if it still holds, else None."""
        entry = self.entries.get(str(index))
        if identity is None or not isinstance(entry, dict):
            return None
        if entry.get("file") != identity or entry.get("expects") != expects:
            return None
        try:
            return _summary_from_json(entry, sample_ids, offsets)
        except (KeyError, TypeError, ValueError):
            return None

    def record(self, index: int, identity, expects: str, summary: ShardSummary) -> None:
        self._changed = True
        self.entries[str(index)] = {
            "file": identity,
            "expects": expects,
            **_summary_to_json(summary),
        }

    def forget(self, index: int) -> None:
        if self.entries.pop(str(index), None) is not None:
            self._changed = True

    def save(self) -> None:
        """Write the cache atomically, if anything changed; a failure only costs the next
        run its shortcut."""
        if not self._changed:
            return
        self._changed = False
        data = {"version": CHECKS_VERSION, "shards": self.entries}
        if not save_cache(self.path, data, default=_jsonable):
            log.warning("could not save the check cache %s", self.path)


def _entry_ok(index: str, entry) -> bool:
    fields = {"file": list, "expects": str, "stats": dict, "attrs": dict, "dataset_bytes": dict}
    return index.isdigit() and has_fields(entry, **fields)


def _cache_ok(data) -> bool:
    # Another version's entries may have another shape: not damage, just not used.
    if not has_fields(data, version=int, shards=dict):
        return False
    return data["version"] != CHECKS_VERSION or mapping_of(_entry_ok)(data["shards"])


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_STATS_FIELDS = ("topk_mass_sum", "entropy_sum", "next_token_in_topk", "next_token_rows")


def _summary_to_json(summary: ShardSummary) -> dict:
    stats = summary.stats
    return {
        "sha256": summary.sha256,
        "bytes": summary.file_bytes,
        "num_samples": summary.num_samples,
        "num_tokens": summary.num_tokens,
        "num_rows": summary.num_rows,
        "loss_mask_ones": summary.loss_mask_ones,
        "attrs": summary.attrs,
        "dataset_bytes": summary.dataset_bytes,
        "stats": {
            "vocab_size": stats.vocab_size,
            "with_entropy": stats.with_entropy,
            "topk_mass_hist": stats.topk_mass_hist.tolist(),
            "entropy_hist": stats.entropy_hist.tolist(),
            **{name: getattr(stats, name) for name in _STATS_FIELDS},
        },
    }


def _summary_from_json(entry: dict, sample_ids, offsets) -> ShardSummary:
    saved = entry["stats"]
    stats = ShardStats(int(saved["vocab_size"]), with_entropy=bool(saved["with_entropy"]))
    for name in ("topk_mass_hist", "entropy_hist"):
        values = np.asarray(saved[name], dtype=np.int64)
        if values.shape != getattr(stats, name).shape:
            raise ValueError(f"{name} has {values.shape}")
        setattr(stats, name, values)
    for name in _STATS_FIELDS:
        setattr(stats, name, saved[name])
    if len(sample_ids) != entry["num_samples"] or int(offsets[-1]) != entry["num_tokens"]:
        raise ValueError("the plan's samples differ from the cached ones")
    return ShardSummary(
        num_samples=int(entry["num_samples"]),
        num_tokens=int(entry["num_tokens"]),
        sample_ids=sample_ids,
        offsets=offsets,
        attrs=dict(entry["attrs"]),
        stats=stats,
        dataset_bytes=dict(entry["dataset_bytes"]),
        num_rows=int(entry["num_rows"]),
        loss_mask_ones=entry["loss_mask_ones"],
        sha256=str(entry["sha256"]),
        file_bytes=int(entry["bytes"]),
    )
