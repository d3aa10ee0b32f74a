"""Writing a shard: rows in order into datasets of their final size, then an atomic commit;
and ``GuardedFile``, through which every HDF5 file of a run is written (shards, prepare's
tokens, gather's index) so that a full disk is one clean error, never a libhdf5 crash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..disk import DISK_FULL_ERRNOS, disk_full
from ..errors import ShardError, UserError
from ..layout import partial_path
from .codec import encode_topk
from .format import (
    CHUNK_ROWS,
    FORMAT_VERSION,
    OPTIONAL_DATASETS,
    SAMPLING_MODE_ATTR,
    TEMPERATURES_ATTR,
    TOPK_ENCODING,
    VALUE_DTYPES,
    compression_options,
    extra_temperatures,
    fsync_dir,
    is_row_dataset,
    stored_row_offsets,
    temperature_dataset,
)
from .values import SCALE_DATASETS


class ShardWriter:
    """Append token rows sample by sample, then ``commit`` atomically (temp file + rename).

    The total row count is known from the shard plan, so datasets are created at
    their final size and rows land in order; nothing is ever appended to a file
    that a previous (killed) process left behind. With the default compression, the
    top-k rows of each whole chunk are encoded and compressed in a thread pool of
    ``compress_threads`` (default: the usable cores, at most 4) and written as finished
    chunks (``chunks``).
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
        temperatures=(1.0,),
        compress_threads: int | None = None,
        sampling=None,
        text=None,
    ):
        """``text``: (text_bytes uint8, text_offsets int64 [S+1]) adds the cross-tokenizer
        fields (``cross_fields``); then every ``write_rows`` brings ``token_offsets`` and
        ``target_logprob``."""
        self.path = Path(path)
        self.temp_path = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num_samples = num_samples
        self.num_tokens = num_tokens
        self.top_k = top_k
        self._guard = GuardedFile(self.temp_path, target=self.path)
        self._file = h5py.File(self._guard, "w")
        opts = compression_options(compression)
        rows = max(1, min(CHUNK_ROWS, num_tokens))
        f = self._file
        f.create_dataset("sample_ids", shape=(num_samples,), dtype=np.int64)
        f.create_dataset("offsets", shape=(num_samples + 1,), dtype=np.int64)
        f.create_dataset("input_ids", shape=(num_tokens,), dtype=np.int32, chunks=(rows,), **opts)
        self._stored = self._init_masked_storage(with_loss_mask, stored_rows, rows, opts)
        num_rows = num_tokens if self._stored is None else int(self._stored.sum())
        rows = max(1, min(CHUNK_ROWS, num_rows))

        def row_dataset(name, dtype, width=None):
            shape = (num_rows,) if width is None else (num_rows, width)
            # HDF5 refuses a chunk larger than an empty dataset unless it may grow.
            grow = {} if num_rows else {"maxshape": (None, *shape[1:])}
            chunks = (rows, *shape[1:])
            return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **grow, **opts)

        if top_k:  # sampled mode stores no top-k
            row_dataset("topk_ids", np.int32, top_k)
            row_dataset("topk_logits", VALUE_DTYPES[value_dtype], top_k)
            if value_dtype == "int8":
                for name in SCALE_DATASETS:
                    row_dataset(name, np.float32)
        row_dataset("logsumexp", np.float32)
        if with_entropy:
            row_dataset("entropy", np.float16)
        self.extra_temperatures = extra_temperatures(temperatures)
        for temperature in self.extra_temperatures:
            row_dataset(temperature_dataset(temperature), np.float32).attrs["temperature"] = (
                temperature
            )
        self.sampling = sampling if sampling is not None and sampling.draws else None
        if self.sampling is not None:
            drawn = row_dataset("sampled_ids", np.int32, self.sampling.draws)
            drawn.attrs["temperature"] = self.sampling.temperature
            row_dataset("sampled_counts", np.uint8, self.sampling.draws)
        self.with_text = text is not None
        if self.with_text:
            text_bytes, text_offsets = (np.asarray(a) for a in text)
            if len(text_offsets) != num_samples + 1 or text_offsets[-1] != len(text_bytes):
                raise ShardError("text_offsets must hold one text per sample, ending at its bytes")
            f.create_dataset("text_offsets", data=text_offsets.astype(np.int64))
            chunk = (max(1, min(1 << 16, len(text_bytes))),)
            grow = {} if len(text_bytes) else {"maxshape": (None,)}
            f.create_dataset(
                "text_bytes", data=text_bytes.astype(np.uint8), chunks=chunk, **grow, **opts
            )
            tokens = max(1, min(CHUNK_ROWS, num_tokens))
            grow = {} if num_tokens else {"maxshape": (None, 2)}
            f.create_dataset(
                "token_offsets", (num_tokens, 2), np.int32, chunks=(tokens, 2), **grow, **opts
            )
            row_dataset("target_logprob", np.float32)
        self._chunk_rows = rows
        # The default codec's row chunks are compressed in a pool, outside HDF5 (chunks.py);
        # the other compressions go through HDF5's own filters.
        self._chunks = None
        if compression == "default" and num_rows:
            # Imported here: loading Blosc2 takes 1-2 s, which prepare and gather (writing
            # through GuardedFile only) need not pay.
            from . import chunks

            row_sets = {name: f[name] for name in f if is_row_dataset(name)}
            threads = compress_threads or chunks.compress_threads()
            self._chunks = chunks.ChunkPipeline(row_sets, rows, threads)
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
        # Left out, a temperature's rows would stay zeros that can pass for values.
        for temperature in self.extra_temperatures:
            if temperature_dataset(temperature) not in arrays:
                raise ShardError(f"rows without {temperature_dataset(temperature)!r}")
        if self.with_text and not {"token_offsets", "target_logprob"} <= set(arrays):
            raise ShardError("rows without token_offsets and target_logprob")
        # Per-token datasets take every row; top-k rows only the kept ones (masked-only).
        keep = None if self._stored is None else self._stored[r0 : r0 + rows]
        block = {}
        for name, values in arrays.items():
            if name not in self._file:
                continue
            if is_row_dataset(name):
                block[name] = np.asarray(values) if keep is None else np.asarray(values)[keep]
            else:
                self._file[name][r0 : r0 + rows] = values
        kept = rows if keep is None else int(keep.sum())
        if block and kept:
            self._pending.append(block)
            self._pending_rows += kept
        self._rows_done += rows
        if self._pending_rows >= self._chunk_rows:
            self._flush(final=False)
        self._guard.check()  # the disk refused a write: stop now, one clean error

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        block = {n: np.concatenate([p[n] for p in self._pending]) for n in self._pending[0]}
        step = self._chunk_rows
        count = self._pending_rows if final else self._pending_rows // step * step
        r0 = self._written
        if self._chunks is not None:
            for start in range(0, count, step):
                end = min(start + step, count)
                self._chunks.submit(r0 + start, {n: v[start:end] for n, v in block.items()})
        else:
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
        if self._chunks is not None:
            self._chunks.finish()
        f = self._file
        f["sample_ids"][:] = self._sample_ids
        f["offsets"][:] = self._offsets
        if self._stored is not None:
            f.attrs["masked_only"] = True
            f.create_dataset("row_offsets", data=stored_row_offsets(self._stored, self._offsets))
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["topk_encoding"] = TOPK_ENCODING
        f.attrs["top_k"] = self.top_k
        if self.extra_temperatures:  # absent: temperature 1 only, as in every older shard
            f.attrs[TEMPERATURES_ATTR] = json.dumps(sorted([1.0, *self.extra_temperatures]))
        if self.sampling is not None:
            f.attrs[SAMPLING_MODE_ATTR] = self.sampling.mode
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.close()
        self._guard.close()  # fsync; raises if the disk refused a write
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
        try:
            self._file.close()  # safe after a refused write: the guard kept libhdf5 whole
        except Exception:  # noqa: BLE001 - the file is deleted either way
            pass
        finally:
            self._guard.discard()


class GuardedFile:
    """A new file for libhdf5 to write through h5py (``h5py.File(guarded, "w")``) whose
    failed write never reaches libhdf5.

    The first write the disk refuses (full, quota, file-size limit, an I/O error) is
    recorded, and from then on writes go to memory instead (reads see them), so libhdf5
    stays consistent and closes cleanly. The writer calls ``check()`` after its writes
    and ``close()`` at the end; they raise one ``DiskFullError`` line (another I/O error
    as a ``UserError``) once a write was refused, and the writer deletes the file with
    ``discard()``. Unbuffered, so a refused write is seen when it happens.
    """

    def __init__(self, path: str | os.PathLike, target: str | os.PathLike | None = None):
        self.path = Path(path)
        self.target = Path(target) if target is not None else self.path
        self.error: OSError | None = None
        self._raw = open(self.path, "w+b", buffering=0)
        self._pos = 0
        self._kept: list[tuple[int, bytes]] = []  # writes after the refusal, in order

    # The file-object interface of h5py's "fileobj" driver.
    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == os.SEEK_END:
            offset += self._size()
        elif whence == os.SEEK_CUR:
            offset += self._pos
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def _size(self) -> int:
        ends = [start + len(data) for start, data in self._kept]
        return max([os.fstat(self._raw.fileno()).st_size, *ends])

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self._raw.seek(self._pos)
        got = self._raw.readinto(view) or 0
        if self._kept:
            view[got:] = bytes(len(view) - got)
            for start, data in self._kept:
                lo, hi = max(start, self._pos), min(start + len(data), self._pos + len(view))
                if lo < hi:
                    view[lo - self._pos : hi - self._pos] = data[lo - start : hi - start]
            got = len(view)
        self._pos += got
        return got

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self._size() - self._pos) if size < 0 else size)
        return bytes(buffer[: self.readinto(buffer)])

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                rest, at = view, self._pos
                while rest:  # a write may take less than all of it
                    done = os.pwrite(self._raw.fileno(), rest, at)
                    rest, at = rest[done:], at + done
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            self._kept.append((self._pos, bytes(view)))
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._raw.truncate(size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        pass  # unbuffered: nothing waits in Python

    def check(self, needed: int | None = None) -> None:
        """Raise what a refused write means, once one happened."""
        if self.error is None:
            return
        if self.error.errno in DISK_FULL_ERRNOS:
            raise disk_full(self.target, needed, why=self.error.strerror or "")
        raise UserError(
            f"could not write {self.target} ({self.error.strerror or self.error}); check the "
            "disk, then rerun the same command"
        )

    def close(self, sync: bool = True) -> None:
        """Make the file durable (``sync``) and close it; raise if a write was refused."""
        try:
            if sync and self.error is None:
                try:
                    os.fsync(self._raw.fileno())
                except OSError as exc:
                    self.error = exc
        finally:
            self._raw.close()
            self._kept = []
        self.check()

    def discard(self) -> None:
        """Close without checking and delete the file."""
        try:
            self._raw.close()
        finally:
            self._kept = []
            self.path.unlink(missing_ok=True)
