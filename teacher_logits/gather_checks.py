"""Gather's shard checks: each planned shard checked completely and hashed in an isolated
worker process, unless the check cache (``store.validation_cache``) vouches for it.

The head only stats shards (libhdf5 may crash on a corrupt file: only the workers open
them). Valid results are saved to the cache as they come, so a rerun after adding or
replacing a few shards checks only those, and a gather killed midway keeps its work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import h5py
import numpy as np

from .layout import RunLayout
from .sampling import planned_sampling
from .shard_plan import shard_sources
from .store.identity import identity_mismatch, temperature_mismatch
from .store.isolated import check_isolated, default_workers
from .store.prepared import read_prepared_shard
from .store.validate import ForeignShard, ShardExpectation, validate_shard
from .store.validation_cache import (
    ValidationCache,
    expectation_key,
    file_identity,
    hash_unchanged,
)
from .temperatures import planned_temperatures

log = logging.getLogger("gather")

# Seconds between saves of the check cache while shards are checked: a gather killed at
# its time limit keeps most of what it checked.
CACHE_SAVE_S = 60.0


@dataclass
class PlannedSamples:
    """prepare's samples over every segment, without the tokens: what every shard holds,
    for the index and for shards whose check is cached. Offsets and bounds run on across
    segments, as if one tokens file held them all."""

    sample_ids: np.ndarray
    offsets: np.ndarray
    bounds: np.ndarray
    # Per shard: its segment's tokens file and the shard's index in it.
    sources: list


def planned_samples(layout: RunLayout) -> PlannedSamples:
    sources = shard_sources(layout)
    ids, offsets, bounds = [], [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
    for tokens in dict.fromkeys(path for path, _ in sources):
        with h5py.File(tokens, "r", locking=False) as f:
            ids.append(f["sample_ids"][:])
            offsets.append(f["offsets"][1:] + offsets[-1][-1])
            bounds.append(f["shard_bounds"][1:] + bounds[-1][-1])
    return PlannedSamples(
        np.concatenate(ids), np.concatenate(offsets), np.concatenate(bounds), sources
    )


@dataclass
class _Checks:
    """What the shard checks found: valid shards' summaries, bad shards, attributes."""

    summaries: list = field(default_factory=list)  # (index, path, ShardSummary)
    problems: list = field(default_factory=list)  # (index, path, why)
    identities: dict = field(default_factory=dict)  # index -> attributes
    cached: int = 0


def check_shards(
    layout: RunLayout, plan: dict, expected_common: dict, workers, planned: PlannedSamples
) -> _Checks:
    """Every planned shard checked completely and hashed in isolated worker processes,
    except those the check cache vouches for (``store.validation_cache``); ``planned`` is
    ``planned_samples``."""
    shard_paths = [str(layout.shard(i)) for i in range(int(plan["num_shards"]))]
    masked_only = bool(plan["settings"]["generation"].get("store_masked_only", False))
    temperatures = planned_temperatures(plan["settings"])
    sample_ids, offsets, bounds = planned.sample_ids, planned.offsets, planned.bounds
    # A segment's tokens file stands for the tokens its shards are checked against: a new
    # prepare of a segment checks its shards again (a per-shard digest in the plan entry,
    # where there is one, narrows that down once the file stays).
    tokens_identity = {path: file_identity(path) for path, _ in planned.sources}
    common = {
        "attrs": expected_common,
        "vocab_size": plan["vocab_size"],
        "masked_only": masked_only,
        "temperatures": list(temperatures),
    }

    def samples_of(index: int):
        s0, s1 = int(bounds[index]), int(bounds[index + 1])
        return sample_ids[s0:s1], offsets[s0 : s1 + 1] - offsets[s0]

    def check(index: int, progress):
        # Runs in a worker process: a libhdf5 crash on a corrupt file kills only the worker.
        identity = file_identity(shard_paths[index])
        # One shard's tokens at a time: gather's memory does not grow with the dataset.
        prepared = read_prepared_shard(*planned.sources[index])
        ids, shard_offsets, input_ids = prepared.shard_slice(0)
        expected = ShardExpectation(
            sample_ids=ids,
            offsets=shard_offsets,
            input_ids=input_ids,
            attrs={**expected_common, "shard_index": index},
            vocab_size=plan["vocab_size"],
            loss_mask=prepared.loss_mask,
            masked_only=masked_only,
            temperatures=temperatures,
            **planned_sampling(plan["settings"]),
        )
        # Another run's shard (or another index) comes back as a ForeignShard, not read on.
        summary = validate_shard(
            shard_paths[index], expected, progress=progress, foreign=expected.attrs
        )
        if isinstance(summary, ForeignShard):
            return summary
        # Hashed here, right after the check read it (from the page cache where it fits),
        # not one shard at a time in the head.
        summary.sha256 = hash_unchanged(shard_paths[index], identity, progress)
        summary.file_bytes = identity[0]
        return identity, summary

    cache = ValidationCache(layout.gather_checks)
    expects, todo, found = {}, [], _Checks()
    for index, path in enumerate(shard_paths):
        entry = plan["shards"][index] if index < len(plan.get("shards", [])) else None
        tokens = tokens_identity[planned.sources[index][0]]
        expects[index] = expectation_key(
            {**common, "tokens": tokens, "shard_index": index, "plan": entry}
        )
        summary = cache.lookup(index, file_identity(path), expects[index], *samples_of(index))
        if summary is None:
            cache.forget(index)
            todo.append(index)
        else:
            found.summaries.append((index, path, summary))
            found.identities[index] = summary.attrs
    found.cached = len(found.summaries)
    workers = default_workers(workers)
    log.info(
        "checking %d shards in %d worker process(es); %d unchanged since a previous check",
        len(todo), workers, found.cached,
    )  # fmt: skip
    saved_at = time.monotonic()
    try:
        for result in check_isolated(check, todo, workers):
            index = result.item
            if isinstance(result.value, ForeignShard):
                found.identities[index] = result.value.attrs
                wrong = identity_mismatch(
                    result.value.attrs, {**expected_common, "shard_index": index}
                )
                wrong += temperature_mismatch(result.value.attrs, temperatures)
                why = f"not this run's shard {index} ({'; '.join(wrong)})"
                log.info("shard %d is bad: %s: %s", index, shard_paths[index], why)
                found.problems.append((index, shard_paths[index], why))
            elif result.error is None:
                identity, summary = result.value
                log.info("shard %d is valid: %s", index, shard_paths[index])
                found.summaries.append((index, shard_paths[index], summary))
                found.identities[index] = summary.attrs
                cache.record(index, identity, expects[index], summary)
                if time.monotonic() - saved_at > CACHE_SAVE_S:
                    cache.save()
                    saved_at = time.monotonic()
            else:
                log.info("shard %d is bad: %s: %s", index, shard_paths[index], result.error)
                found.problems.append((index, shard_paths[index], result.error))
    finally:
        # Even when some shards are bad (or the job is killed): the good ones stay checked.
        cache.save()
    found.summaries.sort(key=lambda entry: entry[0])
    found.problems.sort(key=lambda entry: entry[0])
    return found
