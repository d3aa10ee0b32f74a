"""Writing a shard: rows in order into datasets of their final size, then an atomic commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import ShardError
from ..layout import partial_path
from .codec import encode_topk
from .format import (
    CHUNK_ROWS,
    FORMAT_VERSION,
    OPTIONAL_DATASETS,
    ROW_DATASETS,
    TOPK_ENCODING,
    VALUE_DTYPES,
    compression_options,
    fsync_dir,
    stored_row_offsets,
)


class ShardWriter:
    """Append token rows sample by sample, then ``commit`` atomically (temp file + rename).

    The total row count is known from the shard plan, so datasets are created at
    their final size and rows land in order; nothing is ever appended to a file
    that a previous (killed) process left behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_samples: int,
        num_tokens: int,
        top_k: int,
        *,
        value_dtype: str = "float16",
        compression: str = "default",
        with_entropy: bool = True,
        with_loss_mask: bool = False,
        stored_rows: np.ndarray | None = None,
    ):
        self.path = Path(path)
        self.temp_path = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num_samples = num_samples
        self.num_tokens = num_tokens
        self.top_k = top_k
        self._file = h5py.File(self.temp_path, "w")
        opts = compression_options(compression)
        rows = max(1, min(CHUNK_ROWS, num_tokens))
        f = self._file
        f.create_dataset("sample_ids", shape=(num_samples,), dtype=np.int64)
        f.create_dataset("offsets", shape=(num_samples + 1,), dtype=np.int64)
        f.create_dataset("input_ids", shape=(num_tokens,), dtype=np.int32, chunks=(rows,), **opts)
        self._stored = self._init_masked_storage(with_loss_mask, stored_rows, rows, opts)
        num_rows = num_tokens if self._stored is None else int(self._stored.sum())
        rows = max(1, min(CHUNK_ROWS, num_rows))
        # HDF5 refuses a chunk larger than an empty dataset unless it may grow.
        wide, flat = ({}, {}) if num_rows else ({"maxshape": (None, top_k)}, {"maxshape": (None,)})
        for name, dtype in (("topk_ids", np.int32), ("topk_logits", VALUE_DTYPES[value_dtype])):
            f.create_dataset(
                name, shape=(num_rows, top_k), dtype=dtype, chunks=(rows, top_k), **wide, **opts
            )
        f.create_dataset(
            "logsumexp", shape=(num_rows,), dtype=np.float32, chunks=(rows,), **flat, **opts
        )
        if with_entropy:
            f.create_dataset(
                "entropy", shape=(num_rows,), dtype=np.float16, chunks=(rows,), **flat, **opts
            )
        self._sample_ids = np.zeros(num_samples, dtype=np.int64)
        self._offsets = np.zeros(num_samples + 1, dtype=np.int64)
        self._samples_done = 0
        self._rows_done = 0
        self._written = 0  # top-k rows written (all rows, or the kept ones when masked-only)
        self._pending: list[dict] = []
        self._pending_rows = 0

    def _init_masked_storage(self, with_loss_mask, stored_rows, chunk_rows, opts):
        """The loss_mask dataset, and which top-k rows are kept (``None``: all of them)."""
        if with_loss_mask or stored_rows is not None:
            self._file.create_dataset(
                "loss_mask", shape=(self.num_tokens,), dtype=np.uint8, chunks=(chunk_rows,), **opts
            )
        if stored_rows is None:
            return None
        stored = np.asarray(stored_rows, dtype=bool)
        if stored.shape != (self.num_tokens,):
            raise ShardError("stored_rows must hold one flag per token")
        return stored

    def write_block(self, sample_ids, lengths, arrays: dict) -> None:
        """Write consecutive samples: ``arrays`` hold their rows concatenated in order."""
        self.add_samples(sample_ids, lengths)
        self.write_rows(arrays)

    def add_samples(self, sample_ids, lengths) -> None:
        """Record the next samples of the shard (their rows come through ``write_rows``)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        n, s0 = len(lengths), self._samples_done
        r0 = int(self._offsets[s0])
        if s0 + n > self.num_samples or r0 + int(lengths.sum()) > self.num_tokens:
            raise ShardError("more samples written than the shard plan holds")
        self._sample_ids[s0 : s0 + n] = sample_ids
        self._offsets[s0 + 1 : s0 + n + 1] = r0 + np.cumsum(lengths)
        self._samples_done += n

    def write_rows(self, arrays: dict) -> None:
        """Append the next token rows, in order (any block size).

        Rows are buffered and written in whole chunks, so no chunk is compressed
        twice; ``topk_ids`` and ``topk_logits`` must come together, in rank order.
        """
        r0 = self._rows_done
        rows = len(next(iter(arrays.values())))
        if r0 + rows > self.num_tokens:
            raise ShardError("more rows written than the shard plan holds")
        for name in arrays:
            if name not in self._file and name not in OPTIONAL_DATASETS:
                raise ShardError(f"unknown shard dataset {name!r}")
        # Per-token datasets take every row; top-k rows only the kept ones (masked-only).
        keep = None if self._stored is None else self._stored[r0 : r0 + rows]
        block = {}
        for name, values in arrays.items():
            if name not in self._file:
                continue
            if name in ROW_DATASETS:
                block[name] = np.asarray(values) if keep is None else np.asarray(values)[keep]
            else:
                self._file[name][r0 : r0 + rows] = values
        kept = rows if keep is None else int(keep.sum())
        if block and kept:
            self._pending.append(block)
            self._pending_rows += kept
        self._rows_done += rows
        if self._pending_rows >= CHUNK_ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        block = {n: np.concatenate([p[n] for p in self._pending]) for n in self._pending[0]}
        count = self._pending_rows if final else self._pending_rows // CHUNK_ROWS * CHUNK_ROWS
        r0 = self._written
        if "topk_ids" in block:
            block["topk_ids"][:count], block["topk_logits"][:count] = encode_topk(
                block["topk_ids"][:count], block["topk_logits"][:count]
            )
        for name, values in block.items():
            self._file[name][r0 : r0 + count] = values[:count]
        self._written += count
        self._pending_rows -= count
        self._pending = [{n: v[count:] for n, v in block.items()}] if self._pending_rows else []

    def commit(self, attrs: dict) -> Path:
        if self._samples_done != self.num_samples or self._rows_done != self.num_tokens:
            raise ShardError(
                f"shard incomplete: {self._samples_done}/{self.num_samples} samples, "
                f"{self._rows_done}/{self.num_tokens} rows"
            )
        self._flush(final=True)
        f = self._file
        f["sample_ids"][:] = self._sample_ids
        f["offsets"][:] = self._offsets
        if self._stored is not None:
            f.attrs["masked_only"] = True
            f.create_dataset("row_offsets", data=stored_row_offsets(self._stored, self._offsets))
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["topk_encoding"] = TOPK_ENCODING
        f.attrs["top_k"] = self.top_k
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.close()
        with open(self.temp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.temp_path.unlink(missing_ok=True)
