"""prepare's output: every kept sample's tokens plus the shard plan (``prepared/tokens.h5``).

Written once by ``prepare`` as it streams through the dataset; each generate job
reads only its own shard's slice, gather one shard's slice at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..disk import FILE_OVERHEAD_BYTES, ensure_room
from ..errors import ShardError
from ..layout import partial_path
from .format import FORMAT_VERSION
from .writer import GuardedFile


@dataclass
class PreparedTokens:
    sample_ids: np.ndarray  # int64 [S] row numbers in the loaded dataset
    offsets: np.ndarray  # int64 [S+1]
    input_ids: np.ndarray  # int32 [T]
    shard_bounds: np.ndarray  # int64 [num_shards+1]: shard i owns samples bounds[i]:bounds[i+1]
    loss_mask: np.ndarray | None = None  # uint8 [T], chat data only
    # storage.cross_tokenizer_fields: int32 [T, 2] byte spans, the UTF-8 text of sample s
    # at text_bytes[text_offsets[s]:text_offsets[s+1]] (store/cross_fields.py)
    token_offsets: np.ndarray | None = None
    text_bytes: np.ndarray | None = None
    text_offsets: np.ndarray | None = None

    @property
    def num_shards(self) -> int:
        return len(self.shard_bounds) - 1

    def shard_slice(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample_ids, offsets rebased to 0, input_ids) of one shard."""
        s0, s1 = int(self.shard_bounds[shard]), int(self.shard_bounds[shard + 1])
        r0, r1 = int(self.offsets[s0]), int(self.offsets[s1])
        return self.sample_ids[s0:s1], self.offsets[s0 : s1 + 1] - r0, self.input_ids[r0:r1]


PREPARED_CHUNK = 1 << 16


class PreparedWriter:
    """prepare's output written as it streams: tokens appended batch by batch, the small
    per-sample arrays and the shard plan at ``commit`` (temp file + rename).

    A full disk (or ``ulimit -f``) is one ``DiskFullError`` line, found before each write
    where it can be (``ensure_room``) and by the ``GuardedFile`` under libhdf5 where it
    cannot; ``abort`` then leaves no ``.partial`` file.
    """

    def __init__(self, path: str | os.PathLike, with_loss_mask: bool, with_text: bool = False):
        self.path = Path(path)
        self.temp_path = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._guard = GuardedFile(self.temp_path, target=self.path)
        self._file = h5py.File(self._guard, "w")
        self.num_tokens = 0
        self.text_lengths: list[int] | None = [] if with_text else None
        self.num_text_bytes = 0
        names = [("input_ids", np.int32, ())]
        names += [("loss_mask", np.uint8, ())] if with_loss_mask else []
        names += [("token_offsets", np.int32, (2,))] if with_text else []
        # Bytes one token takes on disk: chunks are allocated whole, uncompressed.
        self._token_bytes = sum(np.dtype(d).itemsize * (w[0] if w else 1) for _, d, w in names)
        if with_text:
            names.append(("text_bytes", np.uint8, ()))
        for name, dtype, width in names:
            self._file.create_dataset(
                name,
                shape=(0, *width),
                maxshape=(None, *width),
                dtype=dtype,
                chunks=(PREPARED_CHUNK, *width),
                fletcher32=True,
            )

    def _file_bytes(self, num_tokens: int, extra: int = 0) -> int:
        """An upper bound of the file's size once it holds ``num_tokens`` and ``extra`` bytes."""
        chunks = -(-num_tokens // PREPARED_CHUNK)
        text_chunks = -(-self.num_text_bytes // PREPARED_CHUNK)
        text = text_chunks * PREPARED_CHUNK if self.text_lengths is not None else 0
        return chunks * PREPARED_CHUNK * self._token_bytes + text + extra + FILE_OVERHEAD_BYTES

    def _make_room(self, final_bytes: int) -> None:
        written = self.temp_path.stat().st_size
        ensure_room(self.temp_path, max(0, final_bytes - written), target=self.path)

    def append(
        self,
        input_ids: np.ndarray,
        loss_mask: np.ndarray | None = None,
        token_offsets=None,
        texts=None,
    ) -> None:
        """The next samples' tokens (and, with text, their byte spans and texts, one str each)."""
        n = len(input_ids)
        text = b""
        if self.text_lengths is not None:
            encoded = [t.encode() for t in texts]
            self.text_lengths += [len(t) for t in encoded]
            text = b"".join(encoded)
        self.num_text_bytes += len(text)
        self._make_room(self._file_bytes(self.num_tokens + n))
        for name, values in (
            ("input_ids", input_ids),
            ("loss_mask", loss_mask),
            ("token_offsets", token_offsets),
        ):
            if name in self._file:
                ds = self._file[name]
                ds.resize(self.num_tokens + n, axis=0)
                ds[self.num_tokens :] = values
        if text:
            ds = self._file["text_bytes"]
            ds.resize(self.num_text_bytes, axis=0)
            ds[self.num_text_bytes - len(text) :] = np.frombuffer(text, dtype=np.uint8)
        self.num_tokens += n
        self._guard.check()

    def commit(self, sample_ids: np.ndarray, offsets: np.ndarray, shard_bounds: np.ndarray) -> None:
        if int(offsets[-1]) != self.num_tokens:
            raise ShardError(f"offsets end at {offsets[-1]}, but {self.num_tokens} tokens written")
        arrays = {
            "sample_ids": np.asarray(sample_ids, dtype=np.int64),
            "offsets": np.asarray(offsets, dtype=np.int64),
            "shard_bounds": np.asarray(shard_bounds, dtype=np.int64),
        }
        if self.text_lengths is not None:
            if len(self.text_lengths) != len(sample_ids):
                raise ShardError(f"{len(self.text_lengths)} texts for {len(sample_ids)} samples")
            arrays["text_offsets"] = np.concatenate([[0], np.cumsum(self.text_lengths)]).astype(
                np.int64
            )
        self._make_room(self._file_bytes(self.num_tokens, sum(a.nbytes for a in arrays.values())))
        f = self._file
        f.attrs["format_version"] = FORMAT_VERSION
        for name, values in arrays.items():
            f.create_dataset(name, data=values)
        f.close()
        self._guard.close()  # fsync; raises if the disk refused a write
        os.replace(self.temp_path, self.path)

    def abort(self) -> None:
        try:
            self._file.close()  # safe after a refused write: the guard skips what follows
        except Exception:  # noqa: BLE001 - the file is deleted either way
            pass
        finally:
            self._guard.discard()


def write_prepared(path: str | os.PathLike, prepared: PreparedTokens) -> None:
    with_text = prepared.text_bytes is not None
    writer = PreparedWriter(path, prepared.loss_mask is not None, with_text)
    try:
        texts = None
        if with_text:
            data, at = prepared.text_bytes.tobytes(), prepared.text_offsets
            texts = [data[at[s] : at[s + 1]].decode() for s in range(len(at) - 1)]
        writer.append(
            prepared.input_ids.astype(np.int32), prepared.loss_mask, prepared.token_offsets, texts
        )
        writer.commit(prepared.sample_ids, prepared.offsets, prepared.shard_bounds)
    except BaseException:
        writer.abort()
        raise


def read_prepared(path: str | os.PathLike) -> PreparedTokens:
    with h5py.File(path, "r", locking=False) as f:
        return PreparedTokens(
            sample_ids=f["sample_ids"][:],
            offsets=f["offsets"][:],
            input_ids=f["input_ids"][:],
            shard_bounds=f["shard_bounds"][:],
            loss_mask=f["loss_mask"][:] if "loss_mask" in f else None,
            **_text_fields(f, slice(None), slice(None)),
        )


def read_prepared_shard(path: str | os.PathLike, shard: int) -> PreparedTokens:
    """One shard's part of prepare's output, reading only its own tokens.

    The result is a one-shard ``PreparedTokens``: its ``shard_slice(0)`` is the shard.
    """
    with h5py.File(path, "r", locking=False) as f:
        # Two bounds, not all of them: gather reads every shard this way.
        s0, s1 = (int(b) for b in f["shard_bounds"][shard : shard + 2])
        offsets = f["offsets"][s0 : s1 + 1]
        r0, r1 = int(offsets[0]), int(offsets[-1])
        return PreparedTokens(
            sample_ids=f["sample_ids"][s0:s1],
            offsets=offsets - r0,
            input_ids=f["input_ids"][r0:r1],
            shard_bounds=np.array([0, s1 - s0], dtype=np.int64),
            loss_mask=f["loss_mask"][r0:r1] if "loss_mask" in f else None,
            **_text_fields(f, slice(s0, s1 + 1), slice(r0, r1)),
        )


def _text_fields(f, samples: slice, rows: slice) -> dict:
    """The samples' texts (offsets rebased to 0) and their tokens' byte spans, if prepared."""
    if "text_offsets" not in f:  # prepared before them, or with cross_tokenizer_fields off
        return {}
    at = f["text_offsets"][samples]
    return {
        "token_offsets": f["token_offsets"][rows],
        "text_bytes": f["text_bytes"][int(at[0]) : int(at[-1])],
        "text_offsets": at - at[0],
    }
