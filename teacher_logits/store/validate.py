"""Checking a shard completely: its structure against the plan, then every value.

Gather, ``verify --deep`` and a resumed generate job call ``validate_shard``. Each
block of rows it checks also feeds a ``ShardStats``, so the manifest's statistics
cost no second pass. ``quick_check`` is the cheap part (open, attributes, dataset
shapes) that ``status`` runs on every finished shard (``identity`` tells shards made
by another run). Needs numpy, h5py and hdf5plugin only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import ShardError
from .codec import ids_from_deltas
from .cross_fields import check_cross_fields, check_target_rows, value_tolerance
from .extra_rows import (
    SAMPLED_DATASETS,
    check_sampled_rows,
    check_temperatures,
    check_tempered_rows,
    check_unused_ranks,
    extra_shapes,
    stored_values,
)
from .format import (
    FORMAT_VERSION,
    OLDEST_READABLE_VERSION,
    REQUIRED_ATTRS,
    SAMPLING_MODE_ATTR,
    TOPK_ENCODING,
    extra_temperatures,
    needed_rows,
    read_attrs,
    stored_row_offsets,
    stored_temperatures,
    temperature_dataset,
)
from .stats import ShardStats

VALIDATE_BLOCK_ROWS = 1 << 16


@dataclass
class ForeignShard:
    """A readable shard made by another run (or for another index): its attributes."""

    attrs: dict


@dataclass(kw_only=True)
class ShardExpectation:
    """What a shard must hold: prepare's slice of it and the attributes of its run."""

    sample_ids: np.ndarray
    offsets: np.ndarray
    input_ids: np.ndarray
    attrs: dict
    vocab_size: int
    # The loss_mask the shard must hold exactly (chat data), else None.
    loss_mask: np.ndarray | None = None
    # Only the rows ``needed_rows`` selects are stored (generation.store_masked_only).
    masked_only: bool = False
    # Every temperature the run stores a logsumexp for, 1.0 included (generation.temperatures).
    temperatures: tuple = (1.0,)
    # Draws per row and generation.mode (sampled modes), and generation.top_p.
    samples: int = 0
    sample_mode: str = "topk"
    top_p: float | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


@dataclass
class ShardSummary:
    """What gather learns from one valid shard."""

    num_samples: int
    num_tokens: int
    sample_ids: np.ndarray
    offsets: np.ndarray
    attrs: dict
    stats: ShardStats
    # Bytes each dataset occupies on disk, after compression (the storage figure).
    dataset_bytes: dict = field(default_factory=dict)
    # Top-k rows stored: num_tokens, or fewer with store_masked_only.
    num_rows: int = -1
    # Tokens with loss_mask 1 (None: the shard has no loss mask).
    loss_mask_ones: int | None = None
    # The file's sha256 and size, when gather's worker hashed it after the check.
    sha256: str | None = None
    file_bytes: int | None = None


def validate_shard(
    path: str | os.PathLike, expected: ShardExpectation, progress=None, *, foreign=None
) -> ShardSummary | ForeignShard:
    """Check one shard completely; raise ``ShardError`` naming the first problem found.

    ``progress()``, if given, is called after each step that reads the file, so a
    watchdog can tell a slow check from libhdf5 spinning on corrupt metadata. With
    ``foreign`` (the attributes that say which run made a shard), a shard that differs
    on them is returned as a ``ForeignShard``, unread beyond its attributes.
    """
    progress = progress or (lambda: None)
    handle = open_shard(path)
    try:
        with handle:
            progress()
            attrs = read_attrs(handle)  # once: reading attributes is a good part of the cost
            if foreign and any(attrs.get(k) != v for k, v in foreign.items()):
                return ForeignShard(attrs)
            return _validate_open_shard(handle, attrs, expected, progress)
    except ShardError:
        raise
    except Exception as exc:  # corrupt metadata surfaces as many h5py/json error types
        raise ShardError(f"corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def open_shard(path: str | os.PathLike) -> h5py.File:
    """The shard opened for reading; ``ShardError`` saying why it cannot be (missing,
    truncated, not HDF5). Opening already compares the file's length with its header."""
    path = Path(path)
    if not path.exists():
        raise ShardError("file is missing")
    try:
        # Unlocked, as every read open here: NFS/Lustre without flock refuse a locking
        # open, and HDF5 refuses one file opened both ways in one process (a LogitStore).
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if truncated:
            raise ShardError(
                f"not a readable HDF5 file: truncated, {truncated.group(1)} of its "
                f"{truncated.group(2)} bytes on disk (an interrupted write or copy)"
            ) from None
        raise ShardError(f"not a readable HDF5 file ({exc})") from None


def quick_check(path: str | os.PathLike, num_samples: int, num_tokens: int) -> dict:
    """The cheap checks (open, attributes, dataset shapes; no data read) of a finished
    shard planned with ``num_samples`` and ``num_tokens``; returns its attributes."""
    with open_shard(path) as handle:
        try:
            attrs = _check_attrs(read_attrs(handle), {})
            top_k = int(attrs["top_k"])
            rows = handle["logsumexp"].shape[0] if "logsumexp" in handle else num_tokens
            if rows != num_tokens and not (attrs.get("masked_only") and rows <= num_tokens):
                raise ShardError(f"holds {rows} top-k rows, the plan has {num_tokens} tokens")
            shapes = {
                "sample_ids": (num_samples,),
                "offsets": (num_samples + 1,),
                "input_ids": (num_tokens,),
                "logsumexp": (rows,),
            }
            if top_k:  # sampled mode stores none
                shapes.update({"topk_ids": (rows, top_k), "topk_logits": (rows, top_k)})
            if "entropy" in handle:
                shapes["entropy"] = (rows,)
            for temperature in extra_temperatures(stored_temperatures(attrs)):
                shapes[temperature_dataset(temperature)] = (rows,)
            if attrs.get(SAMPLING_MODE_ATTR):  # the draws, as wide as each other
                width = handle["sampled_ids"].shape[1:] if "sampled_ids" in handle else ()
                shapes.update({name: (rows, *width) for name in SAMPLED_DATASETS})
            for name, shape in shapes.items():
                if name not in handle:
                    raise ShardError(f"dataset {name!r} is missing")
                found = h5py.h5d.open(handle.id, name.encode()).shape  # no high-level wrapper
                if found != shape:
                    raise ShardError(f"dataset {name!r} has shape {found}, expected {shape}")
            return attrs
        except ShardError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt metadata, as one line
            raise ShardError(f"corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def _validate_open_shard(handle, attrs, expected: ShardExpectation, progress) -> ShardSummary:
    _check_attrs(attrs, expected.attrs)
    progress()
    stored = _expected_stored_rows(handle, expected)
    num_rows = expected.num_tokens if stored is None else int(stored.sum())
    check_temperatures(handle, attrs, expected.temperatures)
    _check_datasets(handle, expected, int(attrs["top_k"]), num_rows, stored is not None)
    check_cross_fields(handle, expected.offsets, num_rows)  # optional: checked when there
    sample_ids, offsets = handle["sample_ids"][:], handle["offsets"][:]
    if not np.array_equal(sample_ids, expected.sample_ids):
        raise ShardError(_sample_ids_problem(sample_ids, expected.sample_ids))
    if not np.array_equal(offsets, expected.offsets):
        raise ShardError("offsets differ from the shard plan (sample lengths changed)")
    loss_mask_ones = _check_loss_mask(handle, expected.loss_mask, stored, offsets)
    stats = ShardStats(expected.vocab_size, with_entropy="entropy" in handle)
    _check_rows(handle, expected, stored, int(attrs["top_k"]), stats, progress)
    progress()
    return ShardSummary(
        num_samples=len(expected.sample_ids),
        num_tokens=expected.num_tokens,
        num_rows=num_rows,
        loss_mask_ones=loss_mask_ones,
        sample_ids=sample_ids,
        offsets=offsets,
        attrs=attrs,
        stats=stats,
        dataset_bytes={
            name: int(ds.id.get_storage_size())
            for name, ds in handle.items()
            if isinstance(ds, h5py.Dataset)
        },
    )


def _check_attrs(attrs: dict, expected_attrs: dict) -> dict:
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise ShardError(f"missing attributes {missing}")
    version = attrs["format_version"]
    if not OLDEST_READABLE_VERSION <= version <= FORMAT_VERSION:
        raise ShardError(
            f"format_version {version}, this workflow reads {OLDEST_READABLE_VERSION} to "
            f"{FORMAT_VERSION}"
        )
    if attrs.get("topk_encoding") != TOPK_ENCODING:
        raise ShardError(
            f"topk_encoding {attrs.get('topk_encoding')!r}, expected {TOPK_ENCODING!r}"
        )
    for key, value in expected_attrs.items():
        if attrs.get(key) != value:
            raise ShardError(f"attribute {key}={attrs.get(key)!r}, expected {value!r}")
    return attrs


def _check_datasets(
    handle, expected: ShardExpectation, top_k: int, num_rows: int, masked_only: bool
) -> None:
    """Every dataset is there, with the shape and dtype the plan implies."""
    num_samples, num_tokens = len(expected.sample_ids), expected.num_tokens
    shapes = {
        "sample_ids": ((num_samples,), np.int64),
        "offsets": ((num_samples + 1,), np.int64),
        "input_ids": ((num_tokens,), np.int32),
        "logsumexp": ((num_rows,), np.float32),
    }
    values = handle.get("topk_logits")
    int8_values = isinstance(values, h5py.Dataset) and values.dtype == np.uint8
    if top_k:
        shapes["topk_ids"] = ((num_rows, top_k), np.int32)
        shapes["topk_logits"] = ((num_rows, top_k), None)
    shapes.update(extra_shapes(expected.samples, num_rows, int8_values))
    if expected.loss_mask is not None:
        shapes["loss_mask"] = ((num_tokens,), np.uint8)
    if masked_only:
        shapes["row_offsets"] = ((num_samples + 1,), np.int64)
    for temperature in extra_temperatures(expected.temperatures):
        shapes[temperature_dataset(temperature)] = ((num_rows,), np.float32)
    for name, (shape, dtype) in shapes.items():
        if name not in handle:
            raise ShardError(f"dataset {name!r} is missing")
        try:
            ds = handle[name]
        except Exception as exc:  # corrupt object header
            raise ShardError(
                f"dataset {name!r} is unreadable ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(ds, h5py.Dataset):
            raise ShardError(f"{name!r} is not a dataset")
        if ds.shape != shape:
            raise ShardError(f"dataset {name!r} has shape {ds.shape}, expected {shape}")
        if dtype is not None and ds.dtype != dtype:
            raise ShardError(f"dataset {name!r} has dtype {ds.dtype}, expected {np.dtype(dtype)}")
    if top_k and handle["topk_logits"].dtype not in (np.float16, np.float32, np.uint8):
        raise ShardError(f"topk_logits has dtype {handle['topk_logits'].dtype}")
    if "entropy" in handle and handle["entropy"].shape != (num_rows,):
        raise ShardError(f"dataset 'entropy' has shape {handle['entropy'].shape}")


def _check_rows(
    handle, expected: ShardExpectation, stored, top_k: int, stats: ShardStats, progress
) -> None:
    """Tokens equal prepare's; top-k rows are sane; each checked block feeds ``stats``."""
    num_tokens, vocab_size = expected.num_tokens, expected.vocab_size
    exp_input_ids, offsets = expected.input_ids, expected.offsets
    # Which rows have a next token inside their own sample: all but each sample's last.
    all_have_next = np.ones(num_tokens, dtype=bool)
    all_have_next[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = False
    c1 = 0  # kept rows read so far (all rows unless masked-only)
    for r0 in range(0, num_tokens, VALIDATE_BLOCK_ROWS):
        progress()
        r1 = min(num_tokens, r0 + VALIDATE_BLOCK_ROWS)
        input_ids = handle["input_ids"][r0:r1]
        if not np.array_equal(input_ids, exp_input_ids[r0:r1]):
            bad = r0 + int(np.flatnonzero(input_ids != exp_input_ids[r0:r1])[0])
            raise ShardError(f"input_ids differ from prepare's tokens at row {bad}")
        # The token rows whose top-k this block holds, and where they are stored.
        rows = np.arange(r0, r1) if stored is None else r0 + np.flatnonzero(stored[r0:r1])
        c0, c1 = c1, c1 + len(rows)
        if not len(rows):
            continue
        lse = handle["logsumexp"][c0:c1]
        if not np.isfinite(lse).all():
            raise ShardError(f"non-finite values in rows {r0}..{r1 - 1}")
        sampled = (handle, c0, c1, expected.samples, expected.sample_mode, vocab_size)
        next_ids = exp_input_ids[np.minimum(rows + 1, num_tokens - 1)]
        targets = "target_logprob" in handle
        if not top_k:  # sampled mode: no top-k rows
            if targets:
                check_target_rows(handle, (c0, c1), all_have_next[rows], next_ids)
            check_sampled_rows(*sampled)
            check_tempered_rows(handle, expected.temperatures, None, (c0, c1), (r0, r1))
            stats.add(
                np.zeros((len(rows), 0), np.int32),
                np.zeros((len(rows), 0), np.float32),
                lse,
                _entropy(handle, c0, c1),
                next_ids,
                all_have_next[rows],
            )
            continue
        # Stored ids ascend strictly per row: a first id >= 0, then gaps >= 1 (distinct ids),
        # but for the ranks top-p left unused (id 0, logit -inf).
        deltas = handle["topk_ids"][c0:c1]
        logits = stored_values(handle, c0, c1)
        ids = ids_from_deltas(deltas)
        unused = check_unused_ranks(ids, logits, deltas, expected.top_p, (r0, r1))
        if ids.size and ids[:, -1].max() >= vocab_size:
            raise ShardError(f"topk_ids outside the vocabulary [0, {vocab_size})")
        # The largest logit cannot exceed logsumexp (allow the storage dtype's rounding).
        if (logits.max(axis=1) > lse + 1e-2 * np.maximum(1.0, np.abs(lse))).any():
            raise ShardError(f"logsumexp smaller than the top logit in rows {r0}..{r1 - 1}")
        check_tempered_rows(handle, expected.temperatures, logits, (c0, c1), (r0, r1))
        if expected.samples:
            check_sampled_rows(*sampled, top_ids=np.where(unused, -1, ids))
        if targets:
            top = (np.where(unused, -1, ids), logits, lse, value_tolerance(handle, logits, c0, c1))
            check_target_rows(handle, (c0, c1), all_have_next[rows], next_ids, top)
        stats.add(
            np.where(unused, -1, ids),
            logits,
            lse,
            _entropy(handle, c0, c1),
            next_ids,
            all_have_next[rows],
        )


def _entropy(handle, c0: int, c1: int):
    """Rows c0:c1 of the entropy (None when the shard has none), checked."""
    if "entropy" not in handle:
        return None
    entropy = handle["entropy"][c0:c1].astype(np.float64)
    if not (np.isfinite(entropy).all() and (entropy >= -1e-2).all()):
        raise ShardError(f"entropy negative or not finite in rows {c0}..{c1 - 1}")
    return entropy


def _expected_stored_rows(handle, expected: ShardExpectation):
    """Which top-k rows the shard must hold (``None``: all); refuses a mismatched layout."""
    if expected.masked_only and expected.loss_mask is None:
        raise ShardError("masked-only storage needs the expected loss mask")
    if bool(handle.attrs.get("masked_only", False)) != bool(expected.masked_only):
        want = "only the rows the loss mask trains on" if expected.masked_only else "every row"
        raise ShardError(f"stores the wrong rows: expected {want} (store_masked_only changed?)")
    return needed_rows(expected.loss_mask, expected.offsets) if expected.masked_only else None


def _check_loss_mask(handle, exp_loss_mask, stored, offsets) -> int | None:
    """The stored mask equals prepare's; returns its count of ones."""
    if exp_loss_mask is None:
        if "loss_mask" in handle:
            raise ShardError("has a loss_mask but prepare made none (the data is not chat?)")
        return None
    ones = 0
    for r0 in range(0, len(exp_loss_mask), VALIDATE_BLOCK_ROWS):
        block = handle["loss_mask"][r0 : r0 + VALIDATE_BLOCK_ROWS]
        expected = exp_loss_mask[r0 : r0 + VALIDATE_BLOCK_ROWS]
        if not np.array_equal(block, expected):
            bad = r0 + int(np.flatnonzero(block != expected)[0])
            raise ShardError(f"loss_mask differs from prepare's at row {bad}")
        ones += int(np.count_nonzero(block))
    if stored is not None and not np.array_equal(
        handle["row_offsets"][:], stored_row_offsets(stored, offsets)
    ):
        raise ShardError("row_offsets do not match the rows the loss mask keeps")
    return ones


def _sample_ids_problem(found: np.ndarray, expected: np.ndarray) -> str:
    """Why a shard's sample ids are not the planned ones, as specifically as possible."""
    values, counts = np.unique(found, return_counts=True)
    if (counts > 1).any():
        repeated = values[counts > 1]
        return (
            f"sample_ids differ from the shard plan: {len(repeated)} id(s) appear more than "
            f"once (e.g. {int(repeated[0])}), so samples are duplicated"
        )
    foreign = np.setdiff1d(found, expected)
    if len(foreign):
        return (
            f"sample_ids differ from the shard plan: {len(foreign)} id(s) belong to another shard "
            f"or to no shard (e.g. {int(foreign[0])}), so samples overlap or the file was swapped"
        )
    return "sample_ids differ from the shard plan written by prepare (order or count)"
