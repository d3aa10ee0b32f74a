"""The optional row datasets (extra temperatures, the sampled modes' draws, the int8
value codec): their shapes, and the checks gather and ``verify --deep`` run on them.

- ``sampled_ids`` int32 / ``sampled_counts`` uint8 [rows, samples]: each row's distinct
  drawn ids in ascending order with their counts, then unused slots (id 0, count 0).
  ``sampled_ids`` carries the draws' ``temperature`` as an attribute; the file, the
  ``sampling_mode``.
- ``topk_logits_max`` / ``topk_logits_step`` float32 [rows]: ``storage.value_dtype: int8``
  (``values``).

Needs numpy and h5py only.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShardError
from ..temperatures import normalise_temperatures
from .format import (
    dataset_temperature,
    extra_temperatures,
    stored_temperatures,
    temperature_dataset,
)
from .values import SCALE_DATASETS, decode_int8

SAMPLED_DATASETS = ("sampled_ids", "sampled_counts")


def extra_shapes(samples: int, num_rows: int, int8_values: bool) -> dict:
    """name -> (shape, dtype) of the extra row datasets a shard must hold."""
    shapes = {}
    if samples:
        shapes["sampled_ids"] = ((num_rows, samples), np.int32)
        shapes["sampled_counts"] = ((num_rows, samples), np.uint8)
    if int8_values:
        shapes.update({name: ((num_rows,), np.float32) for name in SCALE_DATASETS})
    return shapes


def stored_values(handle, c0: int, c1: int) -> np.ndarray:
    """float32 top-k values of stored rows c0:c1 in stored (id) order, int8 codes decoded."""
    values = handle["topk_logits"][c0:c1]
    if values.dtype == np.uint8:
        top, step = (handle[name][c0:c1] for name in SCALE_DATASETS)
        if not (np.isfinite(top).all() and np.isfinite(step).all() and (step > 0).all()):
            raise ShardError(f"non-finite or non-positive int8 scales in rows {c0}..{c1 - 1}")
        return decode_int8(values, top, step)
    return values.astype(np.float32)


def check_unused_ranks(ids, logits, deltas, top_p, span) -> np.ndarray:
    """Ranks left unused by top-p (id 0, logit -inf; only when the run set top_p). Returns
    the mask of unused entries; raises on repeated ids among the used ones."""
    r0, r1 = span
    unused = np.isneginf(logits)
    if unused.any():
        if top_p is None:
            raise ShardError(f"non-finite values in rows {r0}..{r1 - 1}")
        if (ids[unused] != 0).any():
            raise ShardError(
                f"a rank left unused by top_p holds an id other than 0 in rows {r0}..{r1 - 1}"
            )
        if unused.all(axis=1).any():
            raise ShardError(f"a top-p row keeps no rank in rows {r0}..{r1 - 1}")
    if deltas.size and deltas[:, 0].min() < 0:
        raise ShardError(
            f"repeated or unordered token ids inside a top-k row in rows {r0}..{r1 - 1}"
        )
    repeat_ok = unused[:, 1:] & (ids[:, 1:] == 0)
    if deltas.shape[1] > 1 and ((deltas[:, 1:] < 1) & ~repeat_ok).any():
        raise ShardError(
            f"repeated or unordered token ids inside a top-k row in rows {r0}..{r1 - 1}"
        )
    if not np.isfinite(logits[~unused]).all():
        raise ShardError(f"non-finite values in rows {r0}..{r1 - 1}")
    return unused


def check_sampled_rows(
    handle, c0: int, c1: int, samples: int, mode: str, vocab_size: int, top_ids=None
) -> None:
    """Drawn ids in the vocabulary, ascending and distinct among used slots; counts
    summing to ``samples`` (``topk+sampled``: 0 too, a tail that underflowed); in
    ``topk+sampled``, no draw among the row's ``top_ids`` (the tail excludes them)."""
    ids = handle["sampled_ids"][c0:c1].astype(np.int64)
    counts = handle["sampled_counts"][c0:c1].astype(np.int64)
    where = f"rows {c0}..{c1 - 1}"
    used = counts > 0
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ShardError(f"sampled_ids outside the vocabulary [0, {vocab_size}) in {where}")
    if (ids[~used] != 0).any():
        raise ShardError(f"an unused sample slot (count 0) holds an id other than 0 in {where}")
    # Used slots come first, in ascending id order, each id once.
    if ids.shape[1] > 1:
        if (used[:, 1:] & ~used[:, :-1]).any():
            raise ShardError(f"an unused sample slot before a used one in {where}")
        if ((ids[:, 1:] <= ids[:, :-1]) & used[:, 1:]).any():
            raise ShardError(f"repeated or unordered sampled_ids in {where}")
    if top_ids is not None and mode == "topk+sampled" and top_ids.size:
        inside = (ids[:, :, None] == top_ids[:, None, :]).any(axis=2) & used
        if inside.any():
            row = c0 + int(np.flatnonzero(inside.any(axis=1))[0])
            raise ShardError(f"a tail draw of row {row} is one of its top-k ids")
    totals = counts.sum(axis=1)
    allowed = (totals == samples) | ((totals == 0) & (mode == "topk+sampled"))
    if not allowed.all():
        bad = int(np.flatnonzero(~allowed)[0])
        raise ShardError(
            f"sampled_counts of row {c0 + bad} sum to {int(totals[bad])}, expected {samples}"
        )


def check_temperatures(handle, attrs: dict, expected) -> None:
    """The shard stores a logsumexp for exactly the run's temperatures, each labelled."""
    found, expected = stored_temperatures(attrs), normalise_temperatures(expected)
    if found != expected:
        raise ShardError(
            f"stores logsumexp at temperatures {list(found)}, the run asks for {list(expected)} "
            "(generation.temperatures changed?)"
        )
    for name in handle:
        temperature = dataset_temperature(name)
        if temperature is not None and temperature not in found:
            raise ShardError(f"dataset {name!r} is not among its temperatures {list(found)}")
    for temperature in extra_temperatures(found):
        name = temperature_dataset(temperature)
        if name not in handle:
            raise ShardError(f"dataset {name!r} is missing")
        label = handle[name].attrs.get("temperature")
        label = None if label is None else float(label)
        if label != temperature:
            raise ShardError(
                f"dataset {name!r} has temperature attribute {label!r}, expected {temperature!r}"
            )


def check_tempered_rows(handle, temperatures, logits, stored_span, token_span) -> None:
    """Each extra temperature's logsumexp is finite and at least the top logit / T (within
    the same allowance for the storage dtype's rounding as ``logsumexp``'s check).
    ``logits`` None (a sampled store, no top-k): finite only."""
    (c0, c1), (r0, r1) = stored_span, token_span
    top = None if logits is None else logits.max(axis=1)
    for temperature in extra_temperatures(temperatures):
        name = temperature_dataset(temperature)
        lse = handle[name][c0:c1]
        if not np.isfinite(lse).all():
            raise ShardError(f"non-finite values in {name} in rows {r0}..{r1 - 1}")
        if (
            top is not None
            and (top / temperature > lse + 1e-2 * np.maximum(1.0, np.abs(lse))).any()
        ):
            raise ShardError(
                f"{name} smaller than the top logit / {temperature!r} in rows {r0}..{r1 - 1}"
            )
