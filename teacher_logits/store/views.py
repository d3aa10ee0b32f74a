"""Parts of a store: held-out splits and chosen samples, read like the whole store.

    train, held_out = store.split(0.05, seed=0)   # by a hash of the sample id
    subset = store.select([3, 17, 42])             # these sample ids

A ``StoreView`` is what ``ShardLocalBatchSampler``, ``collate``, ``KDTrainer`` and a
``torch.utils.data.DataLoader`` take in place of a ``LogitStore``: ``len``, ``view[i]``
(i-th of its samples in sample-id order), ``by_sample_id``, and the per-sample arrays
the sampler reads (``sample_ids``, ``sample_shard``, ``sample_position``,
``sample_length``) restricted to its samples; ``num_tokens`` counts its own tokens, and
everything else the store describes (``top_k``, ``vocab_size``, ``temperatures``,
``has_loss_mask``, ``root``, ...) is the store's. A view reads through its store's
open shards and pickles as the store plus its positions, so DataLoader workers get
it cheaply. Needs numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import TrainingInputError
from ..sampling import hash_ids, mix64

# The per-sample arrays of a store's index: a view holds them restricted to its samples.
PER_SAMPLE = ("sample_ids", "sample_shard", "sample_position", "sample_length")


def holdout_mask(sample_ids, fraction: float, seed: int = 0) -> np.ndarray:
    """bool per sample id: held out. A hash of the id (and ``seed``) alone, so the split
    never depends on shard layout, order or which other samples exist; ``snakemake
    distill`` and ``LogitStore.split`` both use it, so their held-out samples agree."""
    z = hash_ids(sample_ids)
    if int(seed):
        with np.errstate(over="ignore"):
            z = mix64(z ^ hash_ids([int(seed)])[0])
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class StoreView:
    """Some samples of a ``LogitStore``, in sample-id order; made by ``split``/``select``."""

    def __init__(self, store, positions: np.ndarray):
        self.base = store  # the LogitStore whose shards it reads
        self.positions = np.asarray(positions, dtype=np.int64)  # into ``base``, ascending
        self._restrict()

    def _restrict(self) -> None:
        for name in PER_SAMPLE:
            setattr(self, name, getattr(self.base, name)[self.positions])
        self.num_tokens = int(self.sample_length.sum())

    def __getattr__(self, name: str):
        # Only what the view does not define itself: the store's description.
        if name.startswith("_") or name in ("base", "positions"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a view of {len(self)}")
        return self.base[int(self.positions[i])]

    def by_sample_id(self, sample_id: int) -> dict:
        i = int(np.searchsorted(self.sample_ids, sample_id))
        if i >= len(self) or self.sample_ids[i] != sample_id:
            raise KeyError(f"sample id {sample_id} is not in this view of the store")
        return self[i]

    def split(self, holdout: float, seed: int = 0) -> tuple[StoreView, StoreView]:
        return split(self, holdout, seed)

    def select(self, sample_ids) -> StoreView:
        return select(self, sample_ids)

    def close(self) -> None:
        self.base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # the store (without open handles) and the positions only
        return {"base": self.base, "positions": self.positions}

    def __setstate__(self, state):
        self.base, self.positions = state["base"], state["positions"]
        self._restrict()

    def __repr__(self) -> str:
        return f"StoreView({len(self)} of {len(self.base)} samples of {self.base.root})"


def _base_and_positions(store) -> tuple:
    if isinstance(store, StoreView):
        return store.base, store.positions
    return store, np.arange(len(store), dtype=np.int64)


def split(store, holdout: float, seed: int = 0) -> tuple[StoreView, StoreView]:
    """``(train, held_out)`` views of ``store`` (a ``LogitStore`` or a view): a sample is
    held out when ``holdout_mask`` says so, about ``holdout`` of them."""
    try:
        fraction = float(holdout)
    except (TypeError, ValueError):
        fraction = math.nan
    if isinstance(holdout, bool) or not 0.0 < fraction < 1.0:
        raise TrainingInputError(
            f"split(holdout={holdout!r}): holdout is the fraction held out; use a number "
            "strictly between 0 and 1, such as 0.05"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TrainingInputError(f"split(seed={seed!r}): use a non-negative integer seed")
    base, positions = _base_and_positions(store)
    held = holdout_mask(base.sample_ids[positions], fraction, seed)
    if held.all() or not held.any():
        side, fix = ("held-out", "larger") if not held.any() else ("training", "smaller")
        raise TrainingInputError(
            f"split(holdout={holdout}) leaves the {side} part empty: none of the "
            f"{len(positions)} samples falls in it; use a {fix} holdout"
        )
    return StoreView(base, positions[~held]), StoreView(base, positions[held])


def select(store, sample_ids) -> StoreView:
    """A view of the samples of ``store`` with these ids, in sample-id order (an id
    given twice is there once). Every id must be in ``store``."""
    wanted = np.asarray(sample_ids)
    if wanted.size == 0:
        raise TrainingInputError(
            "select() was given no sample ids; pass at least one id of the store "
            "(store.sample_ids lists them)"
        )
    if wanted.dtype.kind not in "iu":
        raise TrainingInputError(
            f"select() takes integer sample ids, not {wanted.dtype} values such as "
            f"{wanted.reshape(-1)[0]!r}; pass ids from store.sample_ids"
        )
    wanted = np.unique(wanted.astype(np.int64))
    base, positions = _base_and_positions(store)
    ids = base.sample_ids[positions]
    at = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
    found = ids[at] == wanted if len(ids) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        missing = wanted[~found]
        raise TrainingInputError(
            f"select(): {len(missing)} of the {len(wanted)} sample ids are not in the store "
            f"(first: {int(missing[0])}); pass ids from store.sample_ids (manifest.json lists "
            "the dropped ones)"
        )
    return StoreView(base, positions[at])
