"""Row chunks compressed outside HDF5, in parallel, for ``storage.compression: default``.

h5py holds one lock over every HDF5 call, so a filter that compresses inside HDF5
runs one chunk at a time, however many cores there are. The shard writer instead
encodes and compresses whole chunks in a thread pool (Blosc2's compressors, told
to release the GIL, and numpy's sort run in parallel) and hands the bytes to
``write_direct_chunk``. Each chunk holds exactly what the dataset's own filter pipeline stores (a Blosc2
frame, then the Fletcher-32 checksum), so any reader decodes it through the normal
filters, older ones included, and a flipped bit is still a read error.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blosc2
import numpy as np

from .codec import encode_topk

# python-blosc2 holds the GIL while it compresses unless told otherwise: without this the
# pool's threads compress one at a time (measured: 2 threads no faster than 1).
blosc2.set_releasegil(True)


@dataclass(frozen=True)
class ChunkCodec:
    """Blosc2 settings of one dataset's chunks (zstd, byte shuffle, as format ``default``)."""

    clevel: int
    # One Blosc2 block per chunk: zstd then sees all of a chunk's top-k rows at once and
    # finds the id sets that repeat between rows far apart (~5% smaller ids at a 128k
    # vocabulary than Blosc2's own block size, at level 2's speed; bench/bench_store.py).
    whole_chunk_block: bool = False
    # Byte shuffle: bit shuffle stores every dataset larger here (ids by ~50%: zstd finds
    # the id sets that repeat between rows in bytes, not in bit planes; bench_store.py).
    shuffle: blosc2.Filter = blosc2.Filter.SHUFFLE
    nthreads: int = 1


# Level 1 stores values, logsumexp and entropy as small as level 5 does (within 0.5%) and
# ~5x faster; ids are the one dataset where a higher level pays (bench/bench_store.py).
IDS_CODEC = ChunkCodec(clevel=2, whole_chunk_block=True)
VALUES_CODEC = ChunkCodec(clevel=1)
CODECS = {"topk_ids": IDS_CODEC}


def codec_for(name: str) -> ChunkCodec:
    return CODECS.get(name, VALUES_CODEC)


def compress_threads() -> int:
    """Pool size: the cores this process may use, at most 4 (past that the disk and the
    single HDF5 writer set the pace)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(4, len(usable) if usable else os.cpu_count() or 1))


def fletcher32(data) -> int:
    """HDF5's Fletcher-32 of ``data`` (big-endian 16-bit words, a last odd byte padded)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) % 2:
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    words = raw.view(">u2")
    if not len(words):
        return 0
    # Word i counts (n - i) times in the second sum: the sum of the running sums, each
    # reduced modulo 65535 first so that no frame size can overflow the uint64 total.
    running = np.cumsum(words, dtype=np.uint64)
    first = int(running[-1])
    nonzero = bool(first)
    second = int((running % 65535).sum(dtype=np.uint64))
    return (_fold(second, nonzero) << 16) | _fold(first, nonzero)


def _fold(total: int, nonzero: bool) -> int:
    # HDF5 reduces modulo 65535 by end-around carry, so a sum of words that are not all
    # zero ends in 1..65535, never 0.
    return (total - 1) % 65535 + 1 if nonzero else 0


def compress_chunk(rows: np.ndarray, chunk_rows: int, codec: ChunkCodec) -> bytes:
    """One stored chunk: ``rows`` padded with zeros to ``chunk_rows`` (HDF5 keeps edge
    chunks whole), as a Blosc2 frame followed by its little-endian Fletcher-32."""
    rows = np.ascontiguousarray(rows)
    if len(rows) < chunk_rows:
        padded = np.zeros((chunk_rows, *rows.shape[1:]), dtype=rows.dtype)
        padded[: len(rows)] = rows
        rows = padded
    raw = rows.tobytes()
    cparams = _cparams(codec, rows.dtype.itemsize, len(raw))
    template = _frame_template(codec, rows.dtype.itemsize, len(raw))
    if template is None:
        frame = blosc2.SChunk(chunksize=len(raw), data=raw, cparams=cparams).to_cframe()
    else:
        frame = _frame(*template, blosc2.compress2(raw, **cparams))
    return frame + fletcher32(frame).to_bytes(4, "little")


def _cparams(codec: ChunkCodec, typesize: int, nbytes: int) -> dict:
    return {
        "codec": blosc2.Codec.ZSTD,
        "clevel": codec.clevel,
        "typesize": typesize,
        "filters": [codec.shuffle],
        "nthreads": codec.nthreads,
        "blocksize": nbytes if codec.whole_chunk_block else 0,
    }


# A one-chunk Blosc2 frame is a header, the chunk as ``compress2`` makes it, then an
# offsets chunk and trailer that only depend on the header. Building a frame through
# ``SChunk.to_cframe`` costs ~1 ms whatever the chunk's size (more than compressing
# most chunks), so frames are assembled from a template: the header's frame length and
# compressed size (big-endian int64 fields, c-blosc2's README_CFRAME_FORMAT) are the
# only bytes that change.
_FRAME_LEN_AT, _FRAME_CBYTES_AT = 16, 39


def _frame(head: bytes, tail: bytes, chunk: bytes) -> bytes:
    header = bytearray(head)
    header[_FRAME_LEN_AT : _FRAME_LEN_AT + 8] = (len(head) + len(chunk) + len(tail)).to_bytes(
        8, "big"
    )
    header[_FRAME_CBYTES_AT : _FRAME_CBYTES_AT + 8] = len(chunk).to_bytes(8, "big")
    return bytes(header) + chunk + tail


@functools.lru_cache(maxsize=64)
def _frame_template(codec: ChunkCodec, typesize: int, nbytes: int) -> tuple[bytes, bytes] | None:
    """(header, tail) of frames of ``nbytes`` chunks, or None where the template would not
    rebuild Blosc2's own frames exactly (then each frame is built by Blosc2)."""
    cparams = _cparams(codec, typesize, nbytes)
    rng = np.random.default_rng(0)
    # One chunk that compresses and one that does not: their sizes differ.
    probes = [rng.integers(0, 4, nbytes, dtype=np.uint8), rng.integers(0, 256, nbytes, np.uint8)]
    frames = [
        blosc2.SChunk(chunksize=nbytes, data=p.tobytes(), cparams=cparams).to_cframe()
        for p in probes
    ]
    chunk = blosc2.compress2(probes[0].tobytes(), **cparams)
    start = frames[0].find(chunk)
    if start < 0:
        return None
    head, tail = frames[0][:start], frames[0][start + len(chunk) :]
    for probe, frame in zip(probes, frames):
        if _frame(head, tail, blosc2.compress2(probe.tobytes(), **cparams)) != frame:
            return None
    return head, tail


def encode_and_compress(block: dict, dtypes: dict, chunk_rows: int) -> dict[str, bytes]:
    """Stored chunks of one chunk's rows (``topk_ids`` and ``topk_logits`` in rank order),
    in the datasets' ``dtypes`` (HDF5 would have converted them on a plain write)."""
    block = {name: np.asarray(rows, dtype=dtypes[name]) for name, rows in block.items()}
    if "topk_ids" in block:
        block["topk_ids"], block["topk_logits"] = encode_topk(
            block["topk_ids"], block["topk_logits"]
        )
    return {name: compress_chunk(rows, chunk_rows, codec_for(name)) for name, rows in block.items()}


class ChunkPipeline:
    """Chunks compressed in a pool, written to their datasets in submission order.

    ``submit`` takes the next chunk's rows; finished chunks are written as soon as they
    and every chunk before them are done, so at most ``depth`` chunks wait in memory.
    """

    def __init__(self, datasets: dict, chunk_rows: int, threads: int):
        self.datasets, self.chunk_rows = datasets, chunk_rows
        self._dtypes = {name: dataset.dtype for name, dataset in datasets.items()}
        # Looked up once: h5py's properties cost more than a small chunk's write.
        self._dataset_ids = {name: dataset.id for name, dataset in datasets.items()}
        self._trailing = {name: (0,) * (dataset.ndim - 1) for name, dataset in datasets.items()}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-chunks")
        self._inflight: deque[tuple[int, Future]] = deque()
        self._depth = 2 * threads

    def submit(self, first_row: int, block: dict) -> None:
        task = self._pool.submit(encode_and_compress, block, self._dtypes, self.chunk_rows)
        self._inflight.append((first_row, task))
        while self._inflight and (self._inflight[0][1].done() or len(self._inflight) > self._depth):
            self._write_next()

    def _write_next(self) -> None:
        first_row, task = self._inflight.popleft()
        for name, chunk in task.result().items():
            self._dataset_ids[name].write_direct_chunk((first_row, *self._trailing[name]), chunk)

    def finish(self) -> None:
        """Write every submitted chunk; raise the first error a chunk hit."""
        try:
            while self._inflight:
                self._write_next()
        finally:
            self.close()

    def close(self) -> None:
        """Drop what is not written yet (after an error, or to abort)."""
        for _, task in self._inflight:
            task.cancel()
        self._inflight.clear()
        self._pool.shutdown(wait=True)
