"""The store's sample index: read from a gathered ``index.h5``, or, before gather has
run (``LogitStore(output_dir, partial=True)``), built from the shards already finished.

Partial mode opens each finished shard once, for cheap checks only: its attributes
against the run's plan and its sample and token counts against the plan's entry for it. Whether
every row is sound is gather's job (``teacher_logits.gather``); a shard that passes
here can still fail there. Needs numpy and h5py only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from ..layout import RunLayout
from ..temperatures import planned_temperatures
from .format import (
    FORMAT_VERSION,
    OLDEST_READABLE_VERSION,
    read_attrs,
    stored_temperatures,
)
from .identity import FINGERPRINTS, SHARD_FINISHED_AT, identity_mismatch, temperature_mismatch


def open_read_only(path: str | os.PathLike, **cache) -> h5py.File:
    """Every read-only open of the reader: without HDF5's file locking, which fails on
    Lustre and NFS mounts without flock, and which a finished file (written once, then
    renamed into place) does not need."""
    return h5py.File(path, "r", locking=False, **cache)


@dataclass
class StoreIndex:
    """Where each sample is (in sample-id order) and what the store holds."""

    root: Path
    shard_paths: list  # by shard number; in partial mode the unreadable ones too
    sample_ids: np.ndarray
    sample_shard: np.ndarray
    sample_position: np.ndarray
    sample_length: np.ndarray
    top_k: int
    num_tokens: int
    config_fingerprint: str
    has_loss_mask: bool
    masked_only: bool
    temperatures: list
    vocab_size: int | None
    tokenizer_content_fingerprint: str | None
    partial: bool = False
    shards_missing: list = field(default_factory=list)
    shards_skipped: dict = field(default_factory=dict)
    # By shard number: its finished_at when indexed (the reader's pin); None: not recorded.
    shard_finished_at: np.ndarray | None = None


def check_version(version: int, where) -> None:
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {version}; this reader knows up to "
            f"{FORMAT_VERSION}: update the workflow code"
        )
    if version < OLDEST_READABLE_VERSION:
        raise ValueError(
            f"{where} has format_version {version}; this reader reads "
            f"{OLDEST_READABLE_VERSION} to {FORMAT_VERSION}: regenerate the store "
            "(force_regenerate=true)"
        )


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def read_index(index_path: Path, manifest_vocab) -> StoreIndex:
    """A gathered store's index; ``manifest_vocab()`` gives ``vocab_size`` for indexes
    written before it was recorded there."""
    root = index_path.parent
    with open_read_only(index_path) as index:
        attrs = index.attrs
        check_version(int(attrs["format_version"]), index_path)
        vocab_size = attrs.get("vocab_size")
        found = StoreIndex(
            root=root,
            shard_paths=[root / _text(p) for p in index["shard_paths"][:]],
            sample_ids=index["sample_ids"][:],
            sample_shard=index["sample_shard"][:],
            sample_position=index["sample_position"][:],
            sample_length=index["sample_length"][:],
            top_k=int(attrs["top_k"]),
            num_tokens=int(attrs["num_tokens"]),
            config_fingerprint=str(_text(attrs["config_fingerprint"])),
            # Chat data: records carry loss_mask; with masked_only, rows no trainer uses
            # were not stored and read back as zeros (rec["row_stored"] marks the rest).
            has_loss_mask=bool(attrs.get("has_loss_mask", False)),
            masked_only=bool(attrs.get("masked_only", False)),
            # Each has a logsumexp in every record's rec["logsumexp_t"]; older indexes: [1.0].
            temperatures=list(stored_temperatures(attrs)),
            vocab_size=None,
            tokenizer_content_fingerprint=_text(attrs.get("tokenizer_content_fingerprint")),
            # Indexes gathered before it was recorded: the reader pins the rest alone.
            shard_finished_at=index[SHARD_FINISHED_AT][:] if SHARD_FINISHED_AT in index else None,
        )
    if vocab_size is None:
        vocab_size = manifest_vocab()
    found.vocab_size = None if vocab_size is None else int(vocab_size)
    return found


def _load_plan(layout: RunLayout) -> dict:
    """The run's shard plan in ``plan.json``'s shape; the one place partial mode reads it."""
    from ..shard_plan import load_plan  # every segment of the plan, appended ones too

    try:
        return load_plan(layout)
    except FileNotFoundError:
        raise StoreError(
            f"no {layout.index.name} and no plan at {layout.plan}: partial mode reads a run "
            "whose prepare step has finished; run the workflow first"
        ) from None


def partial_index(output_dir: Path) -> StoreIndex:
    """The shards of the run in ``output_dir`` that are finished and are this plan's."""
    layout = RunLayout(output_dir)
    plan = _load_plan(layout)
    temperatures = planned_temperatures(plan["settings"])
    expected = {key: plan[key] for key in FINGERPRINTS if key in plan}
    has_loss_mask = "loss_mask" in plan
    entries = {int(entry["index"]): entry for entry in plan["shards"]}
    numbers = range(int(plan["num_shards"]))
    # Here, not at the top: prepare's modules import the disk checks, which import the store.
    from ..shard_plan import shard_sources
    from .prepared import read_prepared_shard

    sources = shard_sources(layout)
    kept, missing, skipped = [], [], {}
    for shard in numbers:
        path = layout.shard(shard)
        if not path.exists():  # jobs commit shards by an atomic rename: absent = not finished
            missing.append(shard)
            continue
        checks = {**expected, "top_k": plan["top_k"], "shard_index": shard}
        found = _shard_columns(path, checks, entries[shard], (temperatures, has_loss_mask))
        if not isinstance(found, str):
            found = _same_tokens(path, read_prepared_shard(*sources[shard])) or found
        if isinstance(found, str):
            skipped[shard] = found
        else:
            kept.append((shard, *found))
    empty = np.zeros(0, dtype=np.int64)
    sample_ids = np.concatenate([empty, *[ids for _, ids, _, _ in kept]])
    lengths = np.concatenate([empty, *[np.diff(offsets) for _, _, offsets, _ in kept]])
    shard_of = np.concatenate(
        [empty.astype(np.int32), *[np.full(len(ids), s, dtype=np.int32) for s, ids, _, _ in kept]]
    )
    position = np.concatenate([empty, *[np.arange(len(ids)) for _, ids, _, _ in kept]])
    finished_at = np.full(len(numbers), np.nan)  # NaN: a shard left out, never opened
    for shard, _, _, finished in kept:
        finished_at[shard] = finished
    order = np.argsort(sample_ids, kind="stable")
    settings = plan["settings"]
    return StoreIndex(
        root=layout.output_dir,
        shard_paths=[layout.shard(shard) for shard in numbers],
        sample_ids=sample_ids[order],
        sample_shard=shard_of[order],
        sample_position=position[order].astype(np.int64),
        sample_length=lengths[order],
        top_k=int(plan["top_k"]),
        num_tokens=int(lengths.sum()),
        config_fingerprint=str(plan["config_fingerprint"]),
        has_loss_mask=has_loss_mask,
        masked_only=bool(settings.get("generation", {}).get("store_masked_only", False)),
        temperatures=list(temperatures),
        vocab_size=int(plan["vocab_size"]),
        tokenizer_content_fingerprint=plan.get("tokenizer_content_fingerprint"),
        partial=True,
        shards_missing=missing,
        shards_skipped=skipped,
        shard_finished_at=finished_at,
    )


def _same_tokens(path: Path, prepared) -> str | None:
    """Why the shard does not hold the samples and tokens its segment now plans, if so: a
    segment prepared again after an edit leaves the old shard in place until its job runs
    (counts alone would pass an edit that keeps every length)."""
    sample_ids, offsets, input_ids = prepared.shard_slice(0)
    try:
        with open_read_only(path) as handle:
            same = (
                np.array_equal(handle["sample_ids"][:], sample_ids)
                and np.array_equal(handle["offsets"][:], offsets)
                and np.array_equal(handle["input_ids"][:], input_ids)
                and (
                    prepared.loss_mask is None
                    or np.array_equal(handle["loss_mask"][:], prepared.loss_mask)
                )
            )
    except (OSError, KeyError, ValueError) as exc:
        return f"not readable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if not same:
        return "its token ids differ from what prepare now plans for it (rows changed since)"
    return None


def _shard_columns(path: Path, expected: dict, entry: dict, run) -> tuple | str:
    """(sample_ids, offsets, finished_at) of a finished shard that is this plan's, or one
    line saying why it is left out. ``run``: the plan's temperatures and whether it is chat data."""
    temperatures, has_loss_mask = run
    try:
        with open_read_only(path) as handle:
            attrs = read_attrs(handle)
            version = int(attrs.get("format_version", -1))
            if not OLDEST_READABLE_VERSION <= version <= FORMAT_VERSION:
                return (
                    f"format_version {version}, this reader reads "
                    f"{OLDEST_READABLE_VERSION} to {FORMAT_VERSION}"
                )
            wrong = identity_mismatch(attrs, expected) + temperature_mismatch(attrs, temperatures)
            if wrong:
                return f"not this run's shard ({'; '.join(wrong)})"
            if has_loss_mask and "loss_mask" not in handle:
                return "no loss_mask dataset, but the plan has chat data"
            sample_ids, offsets = handle["sample_ids"][:], handle["offsets"][:]
            tokens = handle["input_ids"].shape[0]
            finished_at = float(attrs["finished_at"])
    except (OSError, KeyError, ValueError) as exc:  # truncated, not HDF5, a dataset missing
        return f"not readable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    samples, planned = len(sample_ids), int(entry["num_tokens"])
    if samples != int(entry["num_samples"]) or len(offsets) != samples + 1:
        return f"holds {samples} samples, the plan has {entry['num_samples']}"
    if int(offsets[-1]) != planned or tokens != planned:
        return f"holds {int(offsets[-1])} tokens, the plan has {planned}"
    return sample_ids, offsets, finished_at
