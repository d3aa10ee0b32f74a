"""The shard file format (version 2): names, dtypes, writing, reading, validating.

The one place that knows the HDF5 layout. The generate job writes through
``ShardWriter``, gather checks with ``validate_shard``, and the reader reads with
``read_sample``. Needs numpy, h5py and hdf5plugin only.

Version 2 stores each top-k row sorted by token id, ids as deltas (see
``encode_topk``): a row's ids are then small gaps that compress to about 40% of
rank-ordered ids. ``read_sample`` restores rank order (most likely first; equal
stored values by ascending id). Nothing but the order of exactly equal values is
lost, so storage stays lossless with respect to the stored value dtype.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

try:  # registers the Zstd filter; without it zstd-compressed shards cannot be read
    import hdf5plugin
except ImportError:  # pragma: no cover - listed in requirements
    hdf5plugin = None

FORMAT_VERSION = 2
# How top-k rows are laid out on disk (file attribute ``topk_encoding``).
TOPK_ENCODING = "sorted_id_delta"

# Rows per HDF5 chunk: a random sample read decompresses one or two chunks of
# every dataset, so smaller chunks read faster at random but compress worse
# (bench/bench_reader.py measures the trade; README "Performance" says why this one).
CHUNK_ROWS = 1024
# Rows a part is read back in while a shard is assembled.
PART_READ_BLOCK_ROWS = 1 << 16

REQUIRED_ATTRS = (
    "format_version",
    "top_k",
    "shard_index",
    "num_shards",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "config_fingerprint",
    "cuda_visible_devices",
    "hostname",
    "started_at",
    "finished_at",
    "versions",
    "claims",
)

# Datasets a shard may leave out (entropy when store_entropy is off, loss_mask for
# plain-text data).
OPTIONAL_DATASETS = ("entropy", "loss_mask")
# Datasets with one entry per top-k row: all T rows, or with generation.store_masked_only
# only the rows a trainer uses (``needed_rows``).
ROW_DATASETS = ("topk_ids", "topk_logits", "logsumexp", "entropy")

VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}
COMPRESSIONS = ("default", "zstd", "gzip", "lzf", "none")


class ShardError(ValueError):
    """A shard that is missing, unreadable or inconsistent; the message says what."""


def compression_options(name: str) -> dict:
    """h5py dataset keyword arguments for a ``storage.compression`` name."""
    options: dict = {"fletcher32": True}  # a flipped bit becomes a read error
    if name in ("default", "zstd") and hdf5plugin is None:
        raise ShardError(f"storage.compression={name} needs the hdf5plugin package")
    if name == "default":
        # Blosc2's own byte shuffle + Zstandard level 5: smaller than level 3 by ~5% on
        # top-k rows and still fast to write and read (bench/bench_storage.py).
        blosc2 = hdf5plugin.Blosc2
        options.update(blosc2(cname="zstd", clevel=5, filters=blosc2.SHUFFLE))
    elif name == "zstd":
        options.update(shuffle=True, **hdf5plugin.Zstd(clevel=3))
    elif name == "gzip":
        options.update(shuffle=True, compression="gzip", compression_opts=4)
    elif name == "lzf":
        options.update(shuffle=True, compression="lzf")
    elif name != "none":
        raise ShardError(f"storage.compression={name!r}: use one of {', '.join(COMPRESSIONS)}")
    return options


# --- top-k row encoding (format version 2) ------------------------------------------
#
# On disk, each row's k ids are sorted ascending and stored as the first id then
# the gaps (``topk_ids``), with the values in that same order (``topk_logits``).
# Readers get rank order back from ``decode_topk``.


def _position_bits(top_k: int) -> int:
    return max(1, (top_k - 1).bit_length())


def encode_topk(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-ordered ``[n, k]`` ids and values -> (id deltas in id order, values in id order)."""
    ids = np.asarray(ids)
    n, k = ids.shape
    if n == 0:
        return ids.astype(np.int32), np.asarray(values)
    bits = _position_bits(k)
    # One row sort of (id, position) keys gives both the sorted ids and the permutation.
    key = (ids.astype(np.int64) << bits) | np.arange(k, dtype=np.int64)
    key.sort(axis=1)
    order = (key & ((1 << bits) - 1)).astype(np.intp)
    sorted_ids = key >> bits
    deltas = np.empty((n, k), dtype=np.int32)
    deltas[:, 0] = sorted_ids[:, 0]
    np.subtract(sorted_ids[:, 1:], sorted_ids[:, :-1], out=deltas[:, 1:], casting="unsafe")
    return deltas, np.take_along_axis(np.asarray(values), order, axis=1)


def ids_from_deltas(deltas: np.ndarray) -> np.ndarray:
    """Ids in ascending order per row (the stored order)."""
    return np.cumsum(deltas, axis=1, dtype=np.int32)


def _descending_key(bits_view: np.ndarray, sign: int, rest: int) -> np.ndarray:
    """Unsigned keys that sort ascending as the floats (given as their bits) sort descending.

    Its own inverse: positive floats flip their magnitude bits, negative ones keep them.
    """
    return bits_view ^ (((bits_view >> sign) - 1) & rest).astype(bits_view.dtype)


def decode_topk(deltas: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored (id deltas, values in id order) -> rank-ordered (ids, values).

    Most likely first; exactly equal values keep ascending id order. One row sort
    of (value key, position) gives the permutation; values come back out of the key.
    """
    n, k = deltas.shape
    ids = ids_from_deltas(deltas)
    if n == 0:
        return ids, values
    bits = _position_bits(k)
    positions = np.arange(k)
    if values.dtype == np.float16 and bits <= 16:
        desc = _descending_key(values.view(np.uint16), 15, 0x7FFF).astype(np.uint32)
        key = (desc << np.uint32(bits)) | positions.astype(np.uint32)
        key.sort(axis=1)
        order = (key & np.uint32((1 << bits) - 1)).astype(np.intp)
        out_values = _descending_key((key >> np.uint32(bits)).astype(np.uint16), 15, 0x7FFF)
        out_values = out_values.view(np.float16)
    else:
        desc = _descending_key(values.astype(np.float32).view(np.uint32), 31, 0x7FFFFFFF)
        key = (desc.astype(np.uint64) << np.uint64(bits)) | positions.astype(np.uint64)
        key.sort(axis=1)
        order = (key & np.uint64((1 << bits) - 1)).astype(np.intp)
        out_values = np.take_along_axis(values, order, axis=1)
    order += (np.arange(n) * k)[:, None]
    return ids.ravel()[order], out_values


def temp_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


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
        value_dtype: str = "float16",
        compression: str = "default",
        with_entropy: bool = True,
        with_loss_mask: bool = False,
        stored_rows: np.ndarray | None = None,
    ):
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
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
        f.create_dataset("logsumexp", shape=(num_rows,), dtype=np.float32, chunks=(rows,), **flat,
                         **opts)
        if with_entropy:
            f.create_dataset("entropy", shape=(num_rows,), dtype=np.float16, chunks=(rows,),
                             **flat, **opts)
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


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a crash after it cannot undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- loss masks and masked-only storage ----------------------------------------------
#
# Row t predicts token t+1, so a trainer weights row t by loss_mask[t+1]; a sample's
# last row predicts nothing inside it. With ``generation.store_masked_only`` a shard
# keeps only the rows some trainer weight is non-zero for, packed in order;
# ``row_offsets`` [S+1] says where each sample's kept rows start. Which rows were kept
# follows from loss_mask and offsets alone (``needed_rows``), so it is not stored.

# What the reader returns for a row that was not stored: the same zeros the collate
# function pads with. Its trainer weight (loss_mask of the next token) is always 0.
ABSENT_ROW_FILL = 0


def needed_rows(loss_mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """bool [T]: row t is used by a trainer (the next token, inside its sample, is trained on)."""
    loss_mask = np.asarray(loss_mask)
    needed = np.zeros(len(loss_mask), dtype=bool)
    needed[:-1] = loss_mask[1:] != 0
    ends = np.asarray(offsets)[1:]
    needed[ends[ends > 0] - 1] = False
    return needed


def stored_row_offsets(stored: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64 [S+1]: sample s's kept rows are ``row_offsets[s]:row_offsets[s+1]``."""
    cumulative = np.concatenate([[0], np.cumsum(stored, dtype=np.int64)])
    return cumulative[np.asarray(offsets, dtype=np.int64)]


# --- committed parts: a shard's progress, durable across kills ------------------
#
# HDF5 is not crash-safe, so a generation job never resumes writing a half-written
# file. It writes its rows into small part files instead, each made durable with
# fsync + rename once about ``commit_every_s`` of work is in it; a resumed job keeps
# the committed parts and continues after the last one. The finished shard is
# assembled from the parts. Parts are uncompressed (fast to write, read once) and
# hold values already in the stored dtype, so assembly is a pure copy.

PART_DATASETS = ("topk_ids", "topk_logits", "logsumexp", "entropy")


class PartWriter:
    """Rows of consecutive whole samples, appended window by window, then committed.

    The part is built in memory and written with plain file I/O: a full disk then
    raises a clean ``OSError`` instead of failing inside libhdf5, which can crash
    the process on a failed write.
    """

    def __init__(self, path, first_sample: int, first_row: int, top_k: int,
                 value_dtype: str = "float16", with_entropy: bool = True):
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
        self.first_sample, self.first_row = first_sample, first_row
        self.num_samples = self.num_rows = 0
        self._buffer = io.BytesIO()
        self._file = h5py.File(self._buffer, "w")
        dtypes = {"topk_ids": np.int32, "topk_logits": VALUE_DTYPES[value_dtype],
                  "logsumexp": np.float32, "entropy": np.float16}
        for name, dtype in dtypes.items():
            if name == "entropy" and not with_entropy:
                continue
            wide = name in ("topk_ids", "topk_logits")
            self._file.create_dataset(
                name, shape=(0, top_k) if wide else (0,), maxshape=(None, top_k) if wide else (None,),
                chunks=(CHUNK_ROWS, top_k) if wide else (CHUNK_ROWS,), dtype=dtype, fletcher32=True,
            )

    def append(self, num_samples: int, arrays: dict) -> None:
        rows = len(arrays["logsumexp"])
        for name in PART_DATASETS:
            if name in self._file:
                ds = self._file[name]
                ds.resize(self.num_rows + rows, axis=0)
                ds[self.num_rows :] = arrays[name]
        self.num_samples += num_samples
        self.num_rows += rows

    def commit(self, attrs: dict) -> Path:
        f = self._file
        f.attrs.update({"first_sample": self.first_sample, "num_samples": self.num_samples,
                        "first_row": self.first_row, "num_rows": self.num_rows})
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.close()
        try:
            with open(self.temp_path, "wb") as handle:
                handle.write(self._buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            self.temp_path.unlink(missing_ok=True)
            raise
        self._buffer = None
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            if self._file:
                self._file.close()
        finally:
            self._buffer = None
            self.temp_path.unlink(missing_ok=True)


def read_part_attrs(path: str | os.PathLike) -> dict:
    """A committed part's attributes; raises ``ShardError`` if it cannot be read whole."""
    try:
        with h5py.File(path, "r") as f:
            attrs = read_attrs(f)
            for name in PART_DATASETS:
                if name in f and f[name].shape[0] != attrs["num_rows"]:
                    raise ShardError(f"part {path}: dataset {name} has the wrong length")
            return attrs
    except (OSError, KeyError) as exc:
        raise ShardError(f"part {path} is unreadable ({exc})") from None


def iter_part_rows(path: str | os.PathLike, block_rows: int = PART_READ_BLOCK_ROWS):
    """A committed part's rows in blocks: ``(first_row_in_part, {dataset: array})``."""
    with h5py.File(path, "r") as f:
        names = [n for n in PART_DATASETS if n in f]
        total = f["logsumexp"].shape[0]
        for r0 in range(0, total, block_rows):
            yield r0, {n: f[n][r0 : r0 + block_rows] for n in names}


def read_attrs(handle: h5py.File) -> dict:
    out = {}
    for key, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if key in ("versions", "claims") and isinstance(value, str):
            value = json.loads(value)
        out[key] = value
    return out


SAMPLE_FIELDS = ("input_ids", "topk_ids", "topk_logits", "logsumexp", "entropy", "loss_mask")


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
        return _read_masked_only_sample(handle, position, start, stop, record)
    for name in SAMPLE_FIELDS:
        if name in handle:
            record[name] = handle[name][start:stop]
    if "topk_ids" in record:
        record["topk_ids"], record["topk_logits"] = decode_topk(
            record["topk_ids"], record["topk_logits"]
        )
    return record


def _read_masked_only_sample(handle, position: int, start: int, stop: int, record: dict) -> dict:
    """Scatter the kept rows back to their tokens; absent rows read as ``ABSENT_ROW_FILL``."""
    c0, c1 = handle["row_offsets"][position : position + 2]
    record["input_ids"] = handle["input_ids"][start:stop]
    record["loss_mask"] = handle["loss_mask"][start:stop]
    stored = needed_rows(record["loss_mask"], np.array([0, stop - start]))
    kept = {name: handle[name][c0:c1] for name in ROW_DATASETS if name in handle}
    if "topk_ids" in kept:
        kept["topk_ids"], kept["topk_logits"] = decode_topk(kept["topk_ids"], kept["topk_logits"])
    for name, values in kept.items():
        full = np.full((stop - start, *values.shape[1:]), ABSENT_ROW_FILL, dtype=values.dtype)
        full[stored] = values
        record[name] = full
    record["row_stored"] = stored.astype(np.uint8)
    return record


@dataclass
class ShardSummary:
    """What gather learns from one valid shard."""

    num_samples: int
    num_tokens: int
    sample_ids: np.ndarray
    offsets: np.ndarray
    attrs: dict
    topk_mass_sum: float
    topk_mass_hist: np.ndarray
    entropy_sum: float
    next_token_in_topk: int
    next_token_rows: int
    # Report statistics: empty histogram when the shard has no entropy dataset.
    entropy_hist: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dataset_bytes: dict = field(default_factory=dict)
    # Top-k rows stored: num_tokens, or fewer with store_masked_only.
    num_rows: int = -1
    # Tokens with loss_mask 1 (None: the shard has no loss mask).
    loss_mask_ones: int | None = None


MASS_BINS = np.linspace(0.0, 1.0, 21)
ENTROPY_NUM_BINS = 40


def entropy_bins(vocab_size: int) -> np.ndarray:
    """Histogram edges in nats: 0 up to ln(vocab), the entropy of a uniform distribution."""
    return np.linspace(0.0, float(np.log(max(vocab_size, 2))), ENTROPY_NUM_BINS + 1)
VALIDATE_BLOCK_ROWS = 1 << 16


def _expected_stored_rows(handle, exp_loss_mask, exp_offsets, masked_only):
    """Which top-k rows the shard must hold (``None``: all); refuses a mismatched layout."""
    if masked_only and exp_loss_mask is None:
        raise ShardError("masked-only storage needs the expected loss mask")
    if bool(handle.attrs.get("masked_only", False)) != bool(masked_only):
        want = "only the rows the loss mask trains on" if masked_only else "every row"
        raise ShardError(f"stores the wrong rows: expected {want} (store_masked_only changed?)")
    return needed_rows(exp_loss_mask, exp_offsets) if masked_only else None


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


def validate_shard(
    path: str | os.PathLike,
    expected_sample_ids: np.ndarray,
    expected_offsets: np.ndarray,
    expected_input_ids: np.ndarray,
    expected_attrs: dict,
    vocab_size: int,
    expected_loss_mask: np.ndarray | None = None,
    masked_only: bool = False,
    progress=None,
) -> ShardSummary:
    """Check one shard completely; raise ``ShardError`` naming the first problem found.

    ``expected_loss_mask``: the shard must hold exactly this ``loss_mask`` (chat data).
    ``masked_only``: it keeps only the rows ``needed_rows`` selects (store_masked_only).
    ``progress()``, if given, is called after each step that reads the file, so a
    watchdog can tell a slow check from libhdf5 spinning on corrupt metadata.
    """
    progress = progress or (lambda: None)
    path = Path(path)
    if not path.exists():
        raise ShardError("file is missing")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(f"not a readable HDF5 file ({exc})") from None
    try:
        with handle:
            progress()
            return _validate_open_shard(
                handle, expected_sample_ids, expected_offsets, expected_input_ids,
                expected_attrs, vocab_size, progress, expected_loss_mask, masked_only,
            )
    except ShardError:
        raise
    except Exception as exc:  # corrupt metadata surfaces as many h5py/json error types
        raise ShardError(f"corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def _validate_open_shard(handle, exp_ids, exp_offsets, exp_input_ids, exp_attrs, vocab_size,
                         progress, exp_loss_mask=None, masked_only=False):
    missing = [a for a in REQUIRED_ATTRS if a not in handle.attrs]
    if missing:
        raise ShardError(f"missing attributes {missing}")
    attrs = read_attrs(handle)
    progress()
    if attrs["format_version"] != FORMAT_VERSION:
        raise ShardError(
            f"format_version {attrs['format_version']}, this workflow reads {FORMAT_VERSION}"
        )
    if attrs.get("topk_encoding") != TOPK_ENCODING:
        raise ShardError(f"topk_encoding {attrs.get('topk_encoding')!r}, expected {TOPK_ENCODING!r}")
    for key, value in exp_attrs.items():
        if attrs.get(key) != value:
            raise ShardError(f"attribute {key}={attrs.get(key)!r}, expected {value!r}")

    top_k = int(attrs["top_k"])
    num_samples, num_tokens = len(exp_ids), int(exp_offsets[-1])
    stored = _expected_stored_rows(handle, exp_loss_mask, exp_offsets, masked_only)
    num_rows = num_tokens if stored is None else int(stored.sum())
    shapes = {
        "sample_ids": ((num_samples,), np.int64),
        "offsets": ((num_samples + 1,), np.int64),
        "input_ids": ((num_tokens,), np.int32),
        "topk_ids": ((num_rows, top_k), np.int32),
        "topk_logits": ((num_rows, top_k), None),
        "logsumexp": ((num_rows,), np.float32),
    }
    if exp_loss_mask is not None:
        shapes["loss_mask"] = ((num_tokens,), np.uint8)
    if stored is not None:
        shapes["row_offsets"] = ((num_samples + 1,), np.int64)
    for name, (shape, dtype) in shapes.items():
        if name not in handle:
            raise ShardError(f"dataset {name!r} is missing")
        try:
            ds = handle[name]
        except Exception as exc:  # corrupt object header
            raise ShardError(f"dataset {name!r} is unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(ds, h5py.Dataset):
            raise ShardError(f"{name!r} is not a dataset")
        if ds.shape != shape:
            raise ShardError(f"dataset {name!r} has shape {ds.shape}, expected {shape}")
        if dtype is not None and ds.dtype != dtype:
            raise ShardError(f"dataset {name!r} has dtype {ds.dtype}, expected {np.dtype(dtype)}")
    if handle["topk_logits"].dtype not in (np.float16, np.float32):
        raise ShardError(f"topk_logits has dtype {handle['topk_logits'].dtype}")
    has_entropy = "entropy" in handle
    if has_entropy and handle["entropy"].shape != (num_rows,):
        raise ShardError(f"dataset 'entropy' has shape {handle['entropy'].shape}")

    sample_ids = handle["sample_ids"][:]
    offsets = handle["offsets"][:]
    if not np.array_equal(sample_ids, exp_ids):
        raise ShardError(_sample_ids_problem(sample_ids, exp_ids))
    if not np.array_equal(offsets, exp_offsets):
        raise ShardError("offsets differ from the shard plan (sample lengths changed)")
    loss_mask_ones = _check_loss_mask(handle, exp_loss_mask, stored, offsets)

    mass_hist = np.zeros(len(MASS_BINS) - 1, dtype=np.int64)
    ent_bins = entropy_bins(vocab_size)
    entropy_hist = np.zeros(len(ent_bins) - 1 if has_entropy else 0, dtype=np.int64)
    mass_sum = entropy_sum = 0.0
    hits = rows_with_next = 0
    # Which rows have a next token inside their own sample: all but each sample's last.
    c1 = 0  # kept rows read so far (all rows unless masked-only)
    all_have_next = np.ones(num_tokens, dtype=bool)
    all_have_next[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = False
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
        deltas = handle["topk_ids"][c0:c1]
        logits = handle["topk_logits"][c0:c1].astype(np.float32)
        lse = handle["logsumexp"][c0:c1]
        # Stored ids ascend strictly per row: a first id >= 0, then gaps >= 1 (distinct ids).
        if deltas.size and (deltas[:, 0].min() < 0 or (top_k > 1 and deltas[:, 1:].min() < 1)):
            raise ShardError(f"repeated or unordered token ids inside a top-k row in rows {r0}..{r1 - 1}")
        ids = ids_from_deltas(deltas)
        if ids.size and ids[:, -1].max() >= vocab_size:
            raise ShardError(f"topk_ids outside the vocabulary [0, {vocab_size})")
        if not (np.isfinite(logits).all() and np.isfinite(lse).all()):
            raise ShardError(f"non-finite values in rows {r0}..{r1 - 1}")
        # The largest logit cannot exceed logsumexp (allow the storage dtype's rounding).
        if (logits.max(axis=1) > lse + 1e-2 * np.maximum(1.0, np.abs(lse))).any():
            raise ShardError(f"logsumexp smaller than the top logit in rows {r0}..{r1 - 1}")
        mass = np.exp(logits - lse[:, None]).sum(axis=1)
        mass_sum += float(mass.sum())
        mass_hist += np.histogram(np.clip(mass, 0.0, 1.0), bins=MASS_BINS)[0]
        if has_entropy:
            entropy = handle["entropy"][c0:c1].astype(np.float64)
            if not (np.isfinite(entropy).all() and (entropy >= -1e-2).all()):
                raise ShardError(f"entropy negative or not finite in rows {c0}..{c1 - 1}")
            entropy_sum += float(entropy.sum())
            # float16 rounding can step just past ln(vocab): clip into the last bin.
            entropy_hist += np.histogram(np.clip(entropy, 0.0, ent_bins[-1]), bins=ent_bins)[0]
        has_next = all_have_next[rows]
        next_ids = exp_input_ids[np.minimum(rows + 1, num_tokens - 1)]
        hits += int(((ids == next_ids[:, None]).any(axis=1) & has_next).sum())
        rows_with_next += int(has_next.sum())

    progress()
    return ShardSummary(
        num_samples=num_samples,
        num_tokens=num_tokens,
        num_rows=num_rows,
        loss_mask_ones=loss_mask_ones,
        sample_ids=sample_ids,
        offsets=offsets,
        attrs=attrs,
        topk_mass_sum=mass_sum,
        topk_mass_hist=mass_hist,
        entropy_sum=entropy_sum,
        next_token_in_topk=hits,
        next_token_rows=rows_with_next,
        entropy_hist=entropy_hist,
        # Bytes each dataset occupies on disk, after compression (the storage figure).
        dataset_bytes={
            name: int(ds.id.get_storage_size())
            for name, ds in handle.items()
            if isinstance(ds, h5py.Dataset)
        },
    )


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


# --- prepare's output: every kept sample's tokens plus the shard plan --------------


@dataclass
class PreparedTokens:
    sample_ids: np.ndarray  # int64 [S] row numbers in the loaded dataset
    offsets: np.ndarray  # int64 [S+1]
    input_ids: np.ndarray  # int32 [T]
    shard_bounds: np.ndarray  # int64 [num_shards+1]: shard i owns samples bounds[i]:bounds[i+1]
    loss_mask: np.ndarray | None = None  # uint8 [T], chat data only

    @property
    def num_shards(self) -> int:
        return len(self.shard_bounds) - 1

    def shard_slice(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample_ids, offsets rebased to 0, input_ids) of one shard."""
        s0, s1 = int(self.shard_bounds[shard]), int(self.shard_bounds[shard + 1])
        r0, r1 = int(self.offsets[s0]), int(self.offsets[s1])
        return self.sample_ids[s0:s1], self.offsets[s0 : s1 + 1] - r0, self.input_ids[r0:r1]

    def shard_loss_mask(self, shard: int) -> np.ndarray | None:
        """The loss mask of one shard's tokens (``None`` for plain-text data)."""
        if self.loss_mask is None:
            return None
        s0, s1 = int(self.shard_bounds[shard]), int(self.shard_bounds[shard + 1])
        return self.loss_mask[int(self.offsets[s0]) : int(self.offsets[s1])]


PREPARED_CHUNK = 1 << 16


class PreparedWriter:
    """prepare's output written as it streams: tokens appended batch by batch, the small
    per-sample arrays and the shard plan at ``commit`` (temp file + rename)."""

    def __init__(self, path: str | os.PathLike, with_loss_mask: bool):
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.temp_path, "w")
        self.num_tokens = 0
        names = [("input_ids", np.int32)] + ([("loss_mask", np.uint8)] if with_loss_mask else [])
        for name, dtype in names:
            self._file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                      chunks=(PREPARED_CHUNK,), fletcher32=True)

    def append(self, input_ids: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        n = len(input_ids)
        for name, values in (("input_ids", input_ids), ("loss_mask", loss_mask)):
            if name in self._file:
                ds = self._file[name]
                ds.resize(self.num_tokens + n, axis=0)
                ds[self.num_tokens :] = values
        self.num_tokens += n

    def commit(self, sample_ids: np.ndarray, offsets: np.ndarray, shard_bounds: np.ndarray) -> None:
        if int(offsets[-1]) != self.num_tokens:
            raise ShardError(f"offsets end at {offsets[-1]}, but {self.num_tokens} tokens written")
        f = self._file
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("sample_ids", data=np.asarray(sample_ids, dtype=np.int64))
        f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
        f.create_dataset("shard_bounds", data=np.asarray(shard_bounds, dtype=np.int64))
        f.close()
        os.replace(self.temp_path, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.temp_path.unlink(missing_ok=True)


def write_prepared(path: str | os.PathLike, prepared: PreparedTokens) -> None:
    writer = PreparedWriter(path, prepared.loss_mask is not None)
    try:
        writer.append(prepared.input_ids.astype(np.int32), prepared.loss_mask)
        writer.commit(prepared.sample_ids, prepared.offsets, prepared.shard_bounds)
    except BaseException:
        writer.abort()
        raise


def read_prepared(path: str | os.PathLike) -> PreparedTokens:
    with h5py.File(path, "r") as f:
        return PreparedTokens(
            sample_ids=f["sample_ids"][:],
            offsets=f["offsets"][:],
            input_ids=f["input_ids"][:],
            shard_bounds=f["shard_bounds"][:],
            loss_mask=f["loss_mask"][:] if "loss_mask" in f else None,
        )


def read_prepared_sample_ids(path: str | os.PathLike) -> np.ndarray:
    """Every kept sample's id from prepare's output, without its tokens."""
    with h5py.File(path, "r") as f:
        return f["sample_ids"][:]


def read_prepared_shard(path: str | os.PathLike, shard: int) -> PreparedTokens:
    """One shard's part of prepare's output, reading only its own tokens.

    The result is a one-shard ``PreparedTokens``: its ``shard_slice(0)`` is the shard.
    """
    with h5py.File(path, "r") as f:
        bounds = f["shard_bounds"][:]
        s0, s1 = int(bounds[shard]), int(bounds[shard + 1])
        offsets = f["offsets"][s0 : s1 + 1]
        r0, r1 = int(offsets[0]), int(offsets[-1])
        return PreparedTokens(
            sample_ids=f["sample_ids"][s0:s1],
            offsets=offsets - r0,
            input_ids=f["input_ids"][r0:r1],
            shard_bounds=np.array([0, s1 - s0], dtype=np.int64),
            loss_mask=f["loss_mask"][r0:r1] if "loss_mask" in f else None,
        )
