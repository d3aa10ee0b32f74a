"""Random-access reader over a gathered store (``index.h5`` + shards).

Needs numpy, h5py and hdf5plugin only; never Snakemake or torch. It is a
map-style dataset (``__len__`` + ``__getitem__``), so ``torch.utils.data.DataLoader``
takes it directly, with any number of workers: shard handles are opened lazily in
the process that reads (each worker opens its own).

    store = LogitStore("results/demo")
    rec = store[0]                      # i-th sample in sample-id order
    rec = store.by_sample_id(1234)
    rec["logsumexp_t"][2.0]             # {temperature: logsumexp(logits / T)}, 1.0 included
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..layout import INDEX_NAME, MANIFEST_NAME
from .codec import decode_topk
from .format import (
    ABSENT_ROW_FILL,
    FORMAT_VERSION,
    OLDEST_READABLE_VERSION,
    SAMPLE_FIELDS,
    dataset_temperature,
    is_row_dataset,
    needed_rows,
    stored_temperatures,
)


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
        return _with_temperatures(_read_masked_only_sample(handle, position, start, stop, record))
    for name in sample_fields(handle):
        record[name] = handle[name][start:stop]
    if "topk_ids" in record:
        record["topk_ids"], record["topk_logits"] = decode_topk(
            record["topk_ids"], record["topk_logits"]
        )
    return _with_temperatures(record)


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
    record["input_ids"] = handle["input_ids"][start:stop]
    record["loss_mask"] = handle["loss_mask"][start:stop]
    stored = needed_rows(record["loss_mask"], np.array([0, stop - start]))
    kept = {name: handle[name][c0:c1] for name in handle if is_row_dataset(name)}
    if "topk_ids" in kept:
        kept["topk_ids"], kept["topk_logits"] = decode_topk(kept["topk_ids"], kept["topk_logits"])
    for name, values in kept.items():
        full = np.full((stop - start, *values.shape[1:]), ABSENT_ROW_FILL, dtype=values.dtype)
        full[stored] = values
        record[name] = full
    record["row_stored"] = stored.astype(np.uint8)
    return record


def _manifest_field(root: Path, key: str):
    try:
        return json.loads((root / MANIFEST_NAME).read_text()).get(key)
    except (OSError, ValueError):
        return None


class LogitStore:
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.index_path = path / INDEX_NAME if path.is_dir() else path
        if not self.index_path.is_file():
            raise FileNotFoundError(
                f"no index.h5 at {self.index_path}; run the workflow's gather step first"
            )
        self.root = self.index_path.parent
        with h5py.File(self.index_path, "r") as index:
            version = int(index.attrs["format_version"])
            if version > FORMAT_VERSION:
                raise ValueError(
                    f"{self.index_path} has format_version {version}; this reader knows up to "
                    f"{FORMAT_VERSION}: update the workflow code"
                )
            if version < OLDEST_READABLE_VERSION:
                raise ValueError(
                    f"{self.index_path} has format_version {version}; this reader reads "
                    f"{OLDEST_READABLE_VERSION} to {FORMAT_VERSION}: regenerate the store "
                    "(force_regenerate=true)"
                )
            self.top_k = int(index.attrs["top_k"])
            self.num_tokens = int(index.attrs["num_tokens"])
            self.config_fingerprint = str(index.attrs["config_fingerprint"])
            # Chat data: records carry loss_mask; with masked_only, rows no trainer uses
            # were not stored and read back as zeros (rec["row_stored"] marks the rest).
            self.has_loss_mask = bool(index.attrs.get("has_loss_mask", False))
            self.masked_only = bool(index.attrs.get("masked_only", False))
            # Each has a logsumexp in every record's rec["logsumexp_t"]; older indexes: [1.0].
            self.temperatures = list(stored_temperatures(index.attrs))
            # The teacher's vocabulary (its logits' width), and what its tokenizer does
            # (check_tokenizer). Indexes from before they were recorded: from the manifest.
            vocab_size = index.attrs.get("vocab_size")
            self.tokenizer_content_fingerprint = index.attrs.get("tokenizer_content_fingerprint")
            self.shard_paths = [
                self.root / p.decode() if isinstance(p, bytes) else self.root / p
                for p in index["shard_paths"][:]
            ]
            self.sample_ids = index["sample_ids"][:]
            self.sample_shard = index["sample_shard"][:]
            self.sample_position = index["sample_position"][:]
            self.sample_length = index["sample_length"][:]
        if vocab_size is None:
            vocab_size = _manifest_field(self.root, "vocab_size")
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        if isinstance(self.tokenizer_content_fingerprint, bytes):
            self.tokenizer_content_fingerprint = self.tokenizer_content_fingerprint.decode()
        self._handles: dict[int, tuple[h5py.File, np.ndarray, dict]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a store of {len(self)}")
        _, offsets, datasets = self._shard(int(self.sample_shard[i]))
        return read_sample(datasets, int(self.sample_position[i]), offsets)

    def by_sample_id(self, sample_id: int) -> dict:
        i = int(np.searchsorted(self.sample_ids, sample_id))
        if i >= len(self) or self.sample_ids[i] != sample_id:
            raise KeyError(f"sample id {sample_id} is not in the store (dropped or out of range)")
        return self[i]

    def _shard(self, shard: int):
        if os.getpid() != self._pid:  # forked into a DataLoader worker: never share handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            handle = h5py.File(self.shard_paths[shard], "r")
            # Dataset objects and the small index arrays once per shard: looking them up
            # by name on every read costs more than a small sample's decompression.
            datasets = {name: handle[name] for name in sample_fields(handle)}
            datasets["sample_ids"] = handle["sample_ids"][:]
            if "row_offsets" in handle:  # masked-only storage: where each sample's rows start
                datasets["row_offsets"] = handle["row_offsets"][:]
            self._handles[shard] = (handle, handle["offsets"][:], datasets)
        return self._handles[shard]

    def close(self) -> None:
        for handle, _, _ in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self):  # DataLoader with spawn pickles the dataset: drop open handles
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
