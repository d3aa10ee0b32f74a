"""Random-access reader over a gathered store (``index.h5`` + shards).

Needs numpy, h5py and hdf5plugin only; never Snakemake or torch. It is a
map-style dataset (``__len__`` + ``__getitem__``), so ``torch.utils.data.DataLoader``
takes it directly, with any number of workers: shard handles are opened lazily in
the process that reads (each worker opens its own), and at most ``max_open_shards`` of
them at once, so descriptors and chunk-cache memory stay bounded at any store size.

    store = LogitStore("results/demo")
    rec = store[0]                      # i-th sample in sample-id order
    rec = store.by_sample_id(1234)
    rec["logsumexp_t"][2.0]             # {temperature: logsumexp(logits / T)}, 1.0 included
"""

from __future__ import annotations

import errno
import json
import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError, TrainingInputError
from ..layout import INDEX_NAME, MANIFEST_NAME
from . import views
from .codec import decode_topk
from .cross_fields import has_cross_fields, sample_text, text_datasets
from .format import (
    ABSENT_ROW_FILL,
    SAMPLE_FIELDS,
    dataset_temperature,
    is_row_dataset,
    needed_rows,
)
from .identity import PINNED_ATTRS, pin_mismatch
from .partial import open_read_only, partial_index, read_index
from .values import decode_int8


def read_sample(handle, position: int, offsets=None) -> dict:
    """Every per-token array of the sample at ``position`` in this shard, in rank order.

    ``handle``: the open shard, or a dict of its datasets (``sample_ids`` may be an array).
    """
    if offsets is None:
        start, stop = handle["offsets"][position : position + 2]
    else:
        start, stop = offsets[position], offsets[position + 1]
    record = {"sample_id": int(handle["sample_ids"][position])}
    if "row_offsets" in handle:
        record = _read_masked_only_sample(handle, position, start, stop, record)
    else:
        for name in sample_fields(handle):
            record[name] = handle[name][start:stop]
        record = _decoded(record)
    if "text_offsets" in handle:  # the cross-tokenizer fields (cross_fields.py)
        record["text"] = sample_text(handle, position)
    if "sampled_ids" in record:  # what kd_loss checks its temperature against
        record["sample_temperature"] = float(handle["sampled_ids"].attrs.get("temperature", 1.0))
    return _with_temperatures(record)


def _decoded(record: dict) -> dict:
    """Top-k rows back in rank order with float values (int8 codes decoded)."""
    if "topk_ids" in record:
        values = record["topk_logits"]
        if "topk_logits_max" in record:
            top, step = record.pop("topk_logits_max"), record.pop("topk_logits_step")
            values = decode_int8(values, top, step)
        record["topk_ids"], record["topk_logits"] = decode_topk(record["topk_ids"], values)
    return record


def sample_fields(handle) -> list[str]:
    """The per-token datasets of this shard a record carries."""
    names = [name for name in SAMPLE_FIELDS if name in handle]
    return names + [name for name in handle if dataset_temperature(name) is not None]


def _with_temperatures(record: dict) -> dict:
    """``logsumexp_t``: {temperature: its logsumexp rows} for every stored one, 1.0 included
    (the ``logsumexp`` array itself); each ``logsumexp_t{T}`` array moves in there."""
    if "logsumexp" in record:
        tempered = {1.0: record["logsumexp"]}
        for name in [n for n in record if dataset_temperature(n) is not None]:
            tempered[dataset_temperature(name)] = record.pop(name)
        record["logsumexp_t"] = dict(sorted(tempered.items()))
    return record


def _read_masked_only_sample(handle, position: int, start: int, stop: int, record: dict) -> dict:
    """Scatter the kept rows back to their tokens; absent rows read as ``ABSENT_ROW_FILL``."""
    c0, c1 = handle["row_offsets"][position : position + 2]
    for name in ("input_ids", "loss_mask", "token_offsets"):
        if name in handle:
            record[name] = handle[name][start:stop]
    stored = needed_rows(record["loss_mask"], np.array([0, stop - start]))
    kept = _decoded({name: handle[name][c0:c1] for name in handle if is_row_dataset(name)})
    for name, values in kept.items():
        # An absent row has no target log-probability: NaN, as a sample's last row.
        fill = np.nan if name == "target_logprob" else ABSENT_ROW_FILL
        full = np.full((stop - start, *values.shape[1:]), fill, dtype=values.dtype)
        full[stored] = values
        record[name] = full
    record["row_stored"] = stored.astype(np.uint8)
    return record


def _plain(value):
    """An HDF5 attribute as the Python value it was written as."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _manifest_field(root: Path, key: str):
    try:
        return json.loads((root / MANIFEST_NAME).read_text()).get(key)
    except (OSError, ValueError):
        return None


# The training sampler reads pools of at most 8 neighbouring shards
# (training.sampler.MAX_SHARDS_PER_POOL): 16 keeps one pool and the next open without
# reopening any, and 16 descriptors stay far below the per-process limit (commonly
# 1,024) in every DataLoader worker, whatever the number of shards.
DEFAULT_MAX_OPEN_SHARDS = 16
# HDF5's chunk cache, per open dataset (a shard has 5 to 8). A read decompresses the
# whole chunks its rows fall in; the cache keeps them for the next read, so samples read
# in turn that share a chunk (short ones) decompress it once: about 2x the sequential
# read rate of no cache here. 512 KiB holds both chunks a sample straddling a chunk
# boundary touches in the largest dataset at top_k 64 (CHUNK_ROWS x 64 x 4 bytes of
# topk_ids each), at about 2 MiB per open shard against 3 MiB at HDF5's 1 MiB default
# (measured with 16 open); chunks larger than the cache are read past it, still right.
DEFAULT_CHUNK_CACHE_BYTES = 512 << 10
# Hash slots of each dataset's chunk cache: a prime well above the chunks the cache
# holds (HDF5's own default), so chunks read in turn never evict each other.
CHUNK_CACHE_SLOTS = 521


class LogitStore:
    """The samples of a store, by position in sample-id order (``store[i]``) or by
    sample id (``by_sample_id``).

    ``max_open_shards``: at most this many shard files are open at once in each process
    (least recently read closed first). ``chunk_cache_bytes``: HDF5's chunk cache per
    dataset of an open shard. ``partial=True`` reads a run before gather has indexed it:
    the finished shards that are this plan's (``partial.partial_index``: cheap checks
    only, no row validation; ``shards_missing`` and ``shards_skipped`` say what is left
    out). With an ``index.h5`` there, the gathered store is read as usual.

    The index is read once, here: the store is the one gathered then. Each shard file
    opened later is checked against it (``_check_pinned``), and one regenerated since is a
    ``StoreError``; files already open are read on, replaced or not (POSIX keeps them).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
        chunk_cache_bytes: int = DEFAULT_CHUNK_CACHE_BYTES,
        partial: bool = False,
    ):
        if int(max_open_shards) < 1:
            raise TrainingInputError(f"max_open_shards={max_open_shards}: use 1 or more")
        if int(chunk_cache_bytes) < 0:
            raise TrainingInputError(f"chunk_cache_bytes={chunk_cache_bytes}: use 0 or more")
        self.max_open_shards = int(max_open_shards)
        self._cache = {"rdcc_nbytes": int(chunk_cache_bytes), "rdcc_nslots": CHUNK_CACHE_SLOTS}
        path = Path(path)
        self.index_path = path / INDEX_NAME if path.is_dir() else path
        if partial and path.is_dir() and not self.index_path.is_file():
            index = partial_index(path)
        elif not self.index_path.is_file():
            raise FileNotFoundError(
                f"no index.h5 at {self.index_path}; run the workflow's gather step first "
                "(or read the finished shards with LogitStore(output_dir, partial=True))"
            )
        else:
            root = self.index_path.parent
            index = read_index(self.index_path, lambda: _manifest_field(root, "vocab_size"))
        self.__dict__.update(vars(index))
        self._samples_per_shard = np.bincount(self.sample_shard, minlength=len(self.shard_paths))
        self._handles: OrderedDict[int, tuple[h5py.File, np.ndarray, dict]] = OrderedDict()
        self._pid = os.getpid()
        self._cross_fields: bool | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a store of {len(self)}")
        shard, position = int(self.sample_shard[i]), int(self.sample_position[i])
        _, offsets, datasets = self._shard(shard)
        record = read_sample(datasets, position, offsets)
        if record["sample_id"] != self.sample_ids[i]:  # what pins an index without finished_at
            raise StoreError(
                self._regathered(
                    f"shard {shard} holds sample {record['sample_id']} at position {position}, "
                    f"the index says {self.sample_ids[i]}"
                )
            )
        return record

    def by_sample_id(self, sample_id: int) -> dict:
        i = int(np.searchsorted(self.sample_ids, sample_id))
        if i >= len(self) or self.sample_ids[i] != sample_id:
            raise KeyError(f"sample id {sample_id} is not in the store (dropped or out of range)")
        return self[i]

    @property
    def has_cross_tokenizer_fields(self) -> bool:
        """Whether every shard stores ``text``, ``token_offsets`` and ``target_logprob``
        (``storage.cross_tokenizer_fields``); where one lacks them (made before them or
        with the setting off), its records come without those keys."""
        if self._cross_fields is None:
            found = True
            for path in self.shard_paths:
                with open_read_only(path) as handle:
                    found = found and has_cross_fields(handle)
            self._cross_fields = found
        return self._cross_fields

    def split(self, holdout: float, seed: int = 0):
        """``(train, held_out)`` views, by a hash of the sample id (``snakemake distill``'s
        rule): about ``holdout`` of the samples held out. See ``store.views``."""
        return views.split(self, holdout, seed)

    def select(self, sample_ids):
        """A view of the samples with these ids, in sample-id order. See ``store.views``."""
        return views.select(self, sample_ids)

    def _shard(self, shard: int):
        if os.getpid() != self._pid:  # forked into a DataLoader worker: never share handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        while len(self._handles) >= self.max_open_shards:
            handle, _, _ = self._handles.popitem(last=False)[1]
            handle.close()
        handle = self._open(self.shard_paths[shard])
        # Dataset objects and the small index arrays once per shard: looking them up
        # by name on every read costs more than a small sample's decompression.
        datasets = {name: handle[name] for name in sample_fields(handle)}
        datasets["sample_ids"] = handle["sample_ids"][:]
        datasets.update(text_datasets(handle))
        self._check_pinned(shard, handle, len(datasets["sample_ids"]))
        if "row_offsets" in handle:  # masked-only storage: where each sample's rows start
            datasets["row_offsets"] = handle["row_offsets"][:]
        self._handles[shard] = (handle, handle["offsets"][:], datasets)
        return self._handles[shard]

    def _check_pinned(self, shard: int, handle: h5py.File, num_samples: int) -> None:
        """Refuse (and close) a shard file that is not the one the loaded index describes:
        the store was regathered after it was opened."""
        pinned = {}
        if self.shard_finished_at is not None:  # older indexes: the rest, and the ids on read
            pinned["finished_at"] = float(self.shard_finished_at[shard])
        pinned.update(
            shard_index=shard,
            top_k=self.top_k,
            config_fingerprint=self.config_fingerprint,
            num_samples=int(self._samples_per_shard[shard]),
        )
        found = {key: _plain(handle.attrs.get(key)) for key in PINNED_ATTRS}
        why = pin_mismatch({**found, "num_samples": num_samples}, pinned)
        if why:
            handle.close()
            raise StoreError(self._regathered(f"shard {shard}: {why}"))

    def _regathered(self, why: str) -> str:
        return f"the store at {self.root} was regathered after it was opened ({why}); open it again"

    def _open(self, path: Path) -> h5py.File:
        try:
            return open_read_only(path, **self._cache)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # deleted by a regenerate that has not finished
                raise StoreError(
                    f"{path} is gone since the store at {self.root} was opened (being "
                    "regathered?); open it again once gather has finished"
                ) from None
            if exc.errno != errno.EMFILE:
                raise
            raise TrainingInputError(
                f"cannot open {path}: too many open files (this process has "
                f"{len(self._handles)} shards open, max_open_shards={self.max_open_shards}); "
                "lower max_open_shards or raise the limit (ulimit -n)"
            ) from exc

    def close(self) -> None:
        for handle, _, _ in self._handles.values():
            handle.close()
        self._handles = OrderedDict()

    def __getstate__(self):  # DataLoader with spawn pickles the dataset: drop open handles
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
