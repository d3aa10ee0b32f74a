"""The shard file's layout: dataset names, dtypes, version, compression, attributes.

The one place that names what is inside a shard. The codec (``codec``), writer
(``writer``), reader (``reader``) and validation (``validate``) build on it.
Needs numpy, h5py and hdf5plugin only.

Compatibility: readers and gather accept every format version from 2 on, and a
store may mix versions. A new optional dataset does not bump the version; only
a change that an older reader would misread does.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from ..errors import ShardError
from ..temperatures import normalise_temperatures

try:  # registers the Zstd filter; without it zstd-compressed shards cannot be read
    import hdf5plugin
except ImportError:  # pragma: no cover - listed in requirements
    hdf5plugin = None

FORMAT_VERSION = 2
# The oldest format this code reads; every version from here up to FORMAT_VERSION is read.
OLDEST_READABLE_VERSION = 2
# How top-k rows are laid out on disk (file attribute ``topk_encoding``).
TOPK_ENCODING = "sorted_id_delta"

# Rows per HDF5 chunk: a random sample read decompresses one or two chunks of
# every dataset, so smaller chunks read faster at random but compress worse
# (bench/bench_store.py measures the trade; README "Performance" says why this one).
CHUNK_ROWS = 1024

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
# plain-text data, the cross-tokenizer fields of cross_fields.py when they are off or the
# shard predates them).
OPTIONAL_DATASETS = (
    "entropy",
    "loss_mask",
    "text_bytes",
    "text_offsets",
    "token_offsets",
    "target_logprob",
)
# Datasets with one entry per top-k row: all T rows, or with generation.store_masked_only
# only the rows a trainer uses (``needed_rows``). Resume's part files hold these too.
# The sampled modes add sampled_ids/sampled_counts, storage.value_dtype int8 its per-row
# scales (extra_rows.py): optional datasets, no version bump.
ROW_DATASETS = (
    "topk_ids",
    "topk_logits",
    "logsumexp",
    "entropy",
    "sampled_ids",
    "sampled_counts",
    "topk_logits_max",
    "topk_logits_step",
    "target_logprob",
)
# Per-token arrays a sample record carries (those the shard has; temperature datasets too).
SAMPLE_FIELDS = (
    "input_ids",
    "topk_ids",
    "topk_logits",
    "topk_logits_max",
    "topk_logits_step",
    "logsumexp",
    "entropy",
    "loss_mask",
    "sampled_ids",
    "sampled_counts",
    "token_offsets",
    "target_logprob",
)

# int8: 8-bit codes relative to each row's top (store/values.py), decoded by the reader.
VALUE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.uint8}
# File attribute of the sampled modes: generation.mode (the draws' temperature is the
# ``temperature`` attribute of ``sampled_ids``).
SAMPLING_MODE_ATTR = "sampling_mode"
COMPRESSIONS = ("default", "zstd", "gzip", "lzf", "none")


def compression_options(name: str) -> dict:
    """h5py dataset keyword arguments for a ``storage.compression`` name."""
    options: dict = {"fletcher32": True}  # a flipped bit becomes a read error
    if name in ("default", "zstd") and hdf5plugin is None:
        raise ShardError(f"storage.compression={name} needs the hdf5plugin package")
    if name == "default":
        # Blosc2's byte shuffle + Zstandard. HDF5 compresses at level 5 only what it writes
        # itself (input_ids, loss_mask); the shard writer compresses the row datasets'
        # chunks outside HDF5, at the levels store/chunks.py picks per dataset, into the
        # same Blosc2 frames this filter reads (bench/bench_store.py measures both).
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


def read_attrs(handle: h5py.File) -> dict:
    out = {}
    for key, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if key in ("versions", "claims", TEMPERATURES_ATTR) and isinstance(value, str):
            value = json.loads(value)
        out[key] = value
    return out


# --- temperatures (generation.temperatures) ----------------------------------------------
#
# `logsumexp` is temperature 1. Each other temperature T adds the float32 row dataset
# `logsumexp_t{T!r}` (T a Python float: `logsumexp_t2.0`, `logsumexp_t0.5`) holding
# logsumexp(logits / T) over the whole vocabulary, with a `temperature` attribute. The
# file attribute `temperatures` (JSON) lists every stored T, 1.0 included; it is written
# only when there are others, so a shard without it stores temperature 1 alone.
TEMPERATURE_PREFIX = "logsumexp_t"
TEMPERATURES_ATTR = "temperatures"


def temperature_dataset(temperature: float) -> str:
    """The one naming rule: 2 -> ``logsumexp_t2.0``, 0.5 -> ``logsumexp_t0.5``."""
    return f"{TEMPERATURE_PREFIX}{float(temperature)!r}"


def dataset_temperature(name: str) -> float | None:
    """T of a ``logsumexp_t{T}`` dataset, or None for a name the rule does not make."""
    if not name.startswith(TEMPERATURE_PREFIX):
        return None
    try:
        temperature = float(name[len(TEMPERATURE_PREFIX) :])
    except ValueError:
        return None
    return temperature if temperature_dataset(temperature) == name else None


def extra_temperatures(temperatures) -> tuple[float, ...]:
    """The temperatures other than 1.0 (those with a dataset of their own), sorted."""
    return tuple(t for t in normalise_temperatures(temperatures) if t != 1.0)


def row_datasets(temperatures=(1.0,)) -> tuple[str, ...]:
    """Every row dataset a shard with these temperatures may hold."""
    return ROW_DATASETS + tuple(temperature_dataset(t) for t in extra_temperatures(temperatures))


def is_row_dataset(name: str) -> bool:
    return name in ROW_DATASETS or dataset_temperature(name) is not None


def stored_temperatures(attrs: dict) -> tuple[float, ...]:
    """Every temperature a shard (or an index) with these attributes stores, 1.0 included
    (``attrs``: ``read_attrs``' dict, or an h5py ``.attrs`` holding the JSON text)."""
    value = attrs.get(TEMPERATURES_ATTR)
    if isinstance(value, bytes):
        value = value.decode()
    return normalise_temperatures(json.loads(value) if isinstance(value, str) else value)


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
