"""The shard file format (version 1): names, dtypes, writing, reading, validating.

The one place that knows the HDF5 layout. The generate job writes through
``ShardWriter``, gather checks with ``validate_shard``, and the reader reads with
``read_sample``. Needs numpy, h5py and hdf5plugin only.
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

FORMAT_VERSION = 1

# Rows per HDF5 chunk: a random sample read touches one or two chunks, and a
# chunk of 64-wide top-k still compresses well.
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

# Datasets a shard may leave out (entropy when store_entropy is off).
OPTIONAL_DATASETS = ("entropy",)

VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}
COMPRESSIONS = ("default", "zstd", "gzip", "lzf", "none")


class ShardError(ValueError):
    """A shard that is missing, unreadable or inconsistent; the message says what."""


def compression_options(name: str) -> dict:
    """h5py dataset keyword arguments for a ``storage.compression`` name."""
    options: dict = {"fletcher32": True}  # a flipped bit becomes a read error
    if name in ("default", "zstd"):
        if hdf5plugin is None:
            raise ShardError("storage.compression=zstd needs the hdf5plugin package")
        options.update(shuffle=True, **hdf5plugin.Zstd(clevel=3))
    elif name == "gzip":
        options.update(shuffle=True, compression="gzip", compression_opts=4)
    elif name == "lzf":
        options.update(shuffle=True, compression="lzf")
    elif name != "none":
        raise ShardError(f"storage.compression={name!r}: use one of {', '.join(COMPRESSIONS)}")
    return options


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
        for name, dtype in (("topk_ids", np.int32), ("topk_logits", VALUE_DTYPES[value_dtype])):
            f.create_dataset(
                name, shape=(num_tokens, top_k), dtype=dtype, chunks=(rows, top_k), **opts
            )
        f.create_dataset("logsumexp", shape=(num_tokens,), dtype=np.float32, chunks=(rows,), **opts)
        if with_entropy:
            f.create_dataset("entropy", shape=(num_tokens,), dtype=np.float16, chunks=(rows,), **opts)
        self._sample_ids = np.zeros(num_samples, dtype=np.int64)
        self._offsets = np.zeros(num_samples + 1, dtype=np.int64)
        self._samples_done = 0
        self._rows_done = 0

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
        """Append the next token rows, in order (any block size)."""
        r0 = self._rows_done
        rows = len(next(iter(arrays.values())))
        if r0 + rows > self.num_tokens:
            raise ShardError("more rows written than the shard plan holds")
        for name, values in arrays.items():
            if name in self._file:
                self._file[name][r0 : r0 + rows] = values
            elif name not in OPTIONAL_DATASETS:
                raise ShardError(f"unknown shard dataset {name!r}")
        self._rows_done += rows

    def commit(self, attrs: dict) -> Path:
        if self._samples_done != self.num_samples or self._rows_done != self.num_tokens:
            raise ShardError(
                f"shard incomplete: {self._samples_done}/{self.num_samples} samples, "
                f"{self._rows_done}/{self.num_tokens} rows"
            )
        f = self._file
        f["sample_ids"][:] = self._sample_ids
        f["offsets"][:] = self._offsets
        f.attrs["format_version"] = FORMAT_VERSION
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


def read_sample(handle: h5py.File, position: int, offsets=None) -> dict:
    """Every per-token array of the sample at ``position`` in this shard, in rank order."""
    if offsets is None:
        start, stop = handle["offsets"][position : position + 2]
    else:
        start, stop = offsets[position], offsets[position + 1]
    record = {"sample_id": int(handle["sample_ids"][position])}
    for name in SAMPLE_FIELDS:
        if name in handle:
            record[name] = handle[name][start:stop]
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


MASS_BINS = np.linspace(0.0, 1.0, 21)
ENTROPY_NUM_BINS = 40


def entropy_bins(vocab_size: int) -> np.ndarray:
    """Histogram edges in nats: 0 up to ln(vocab), the entropy of a uniform distribution."""
    return np.linspace(0.0, float(np.log(max(vocab_size, 2))), ENTROPY_NUM_BINS + 1)
VALIDATE_BLOCK_ROWS = 1 << 16


def validate_shard(
    path: str | os.PathLike,
    expected_sample_ids: np.ndarray,
    expected_offsets: np.ndarray,
    expected_input_ids: np.ndarray,
    expected_attrs: dict,
    vocab_size: int,
    progress=None,
) -> ShardSummary:
    """Check one shard completely; raise ``ShardError`` naming the first problem found.

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
                expected_attrs, vocab_size, progress,
            )
    except ShardError:
        raise
    except Exception as exc:  # corrupt metadata surfaces as many h5py/json error types
        raise ShardError(f"corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def _validate_open_shard(handle, exp_ids, exp_offsets, exp_input_ids, exp_attrs, vocab_size, progress):
    missing = [a for a in REQUIRED_ATTRS if a not in handle.attrs]
    if missing:
        raise ShardError(f"missing attributes {missing}")
    attrs = read_attrs(handle)
    progress()
    if attrs["format_version"] != FORMAT_VERSION:
        raise ShardError(
            f"format_version {attrs['format_version']}, this workflow reads {FORMAT_VERSION}"
        )
    for key, value in exp_attrs.items():
        if attrs.get(key) != value:
            raise ShardError(f"attribute {key}={attrs.get(key)!r}, expected {value!r}")

    top_k = int(attrs["top_k"])
    num_samples, num_tokens = len(exp_ids), int(exp_offsets[-1])
    shapes = {
        "sample_ids": ((num_samples,), np.int64),
        "offsets": ((num_samples + 1,), np.int64),
        "input_ids": ((num_tokens,), np.int32),
        "topk_ids": ((num_tokens, top_k), np.int32),
        "topk_logits": ((num_tokens, top_k), None),
        "logsumexp": ((num_tokens,), np.float32),
    }
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
    if has_entropy and handle["entropy"].shape != (num_tokens,):
        raise ShardError(f"dataset 'entropy' has shape {handle['entropy'].shape}")

    sample_ids = handle["sample_ids"][:]
    offsets = handle["offsets"][:]
    if not np.array_equal(sample_ids, exp_ids):
        raise ShardError(_sample_ids_problem(sample_ids, exp_ids))
    if not np.array_equal(offsets, exp_offsets):
        raise ShardError("offsets differ from the shard plan (sample lengths changed)")

    mass_hist = np.zeros(len(MASS_BINS) - 1, dtype=np.int64)
    ent_bins = entropy_bins(vocab_size)
    entropy_hist = np.zeros(len(ent_bins) - 1 if has_entropy else 0, dtype=np.int64)
    mass_sum = entropy_sum = 0.0
    hits = rows_with_next = 0
    # Which rows have a next token inside their own sample: all but each sample's last.
    last_rows = offsets[1:] - 1
    for r0 in range(0, num_tokens, VALIDATE_BLOCK_ROWS):
        progress()
        r1 = min(num_tokens, r0 + VALIDATE_BLOCK_ROWS)
        input_ids = handle["input_ids"][r0:r1]
        if not np.array_equal(input_ids, exp_input_ids[r0:r1]):
            bad = r0 + int(np.flatnonzero(input_ids != exp_input_ids[r0:r1])[0])
            raise ShardError(f"input_ids differ from prepare's tokens at row {bad}")
        ids = handle["topk_ids"][r0:r1]
        logits = handle["topk_logits"][r0:r1].astype(np.float32)
        lse = handle["logsumexp"][r0:r1]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ShardError(f"topk_ids outside the vocabulary [0, {vocab_size})")
        if not (np.isfinite(logits).all() and np.isfinite(lse).all()):
            raise ShardError(f"non-finite values in rows {r0}..{r1 - 1}")
        if top_k > 1 and (np.diff(logits, axis=1) > 0).any():
            row = r0 + int(np.flatnonzero((np.diff(logits, axis=1) > 0).any(axis=1))[0])
            raise ShardError(f"topk_logits not sorted most likely first at row {row}")
        if top_k > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise ShardError(f"repeated token ids inside a top-k row in rows {r0}..{r1 - 1}")
        # The largest logit cannot exceed logsumexp (allow the storage dtype's rounding).
        if (logits[:, 0] > lse + 1e-2 * np.maximum(1.0, np.abs(lse))).any():
            raise ShardError(f"logsumexp smaller than the top logit in rows {r0}..{r1 - 1}")
        mass = np.exp(logits - lse[:, None]).sum(axis=1)
        mass_sum += float(mass.sum())
        mass_hist += np.histogram(np.clip(mass, 0.0, 1.0), bins=MASS_BINS)[0]
        if has_entropy:
            entropy = handle["entropy"][r0:r1].astype(np.float64)
            if not (np.isfinite(entropy).all() and (entropy >= -1e-2).all()):
                raise ShardError(f"entropy negative or not finite in rows {r0}..{r1 - 1}")
            entropy_sum += float(entropy.sum())
            # float16 rounding can step just past ln(vocab): clip into the last bin.
            entropy_hist += np.histogram(np.clip(entropy, 0.0, ent_bins[-1]), bins=ent_bins)[0]
        rows = np.arange(r0, r1)
        has_next = ~np.isin(rows, last_rows)
        next_ids = exp_input_ids[np.minimum(rows + 1, num_tokens - 1)]
        hits += int(((ids == next_ids[:, None]).any(axis=1) & has_next).sum())
        rows_with_next += int(has_next.sum())

    progress()
    return ShardSummary(
        num_samples=num_samples,
        num_tokens=num_tokens,
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

    @property
    def num_shards(self) -> int:
        return len(self.shard_bounds) - 1

    def shard_slice(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample_ids, offsets rebased to 0, input_ids) of one shard."""
        s0, s1 = int(self.shard_bounds[shard]), int(self.shard_bounds[shard + 1])
        r0, r1 = int(self.offsets[s0]), int(self.offsets[s1])
        return self.sample_ids[s0:s1], self.offsets[s0 : s1 + 1] - r0, self.input_ids[r0:r1]


def write_prepared(path: str | os.PathLike, prepared: PreparedTokens) -> None:
    path = Path(path)
    temp = temp_path_for(path)
    with h5py.File(temp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("sample_ids", data=prepared.sample_ids.astype(np.int64))
        f.create_dataset("offsets", data=prepared.offsets.astype(np.int64))
        f.create_dataset("input_ids", data=prepared.input_ids.astype(np.int32), fletcher32=True)
        f.create_dataset("shard_bounds", data=prepared.shard_bounds.astype(np.int64))
    os.replace(temp, path)


def read_prepared(path: str | os.PathLike) -> PreparedTokens:
    with h5py.File(path, "r") as f:
        return PreparedTokens(
            sample_ids=f["sample_ids"][:],
            offsets=f["offsets"][:],
            input_ids=f["input_ids"][:],
            shard_bounds=f["shard_bounds"][:],
        )
