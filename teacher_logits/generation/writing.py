"""The writing side of a generate job: part commits and the live shard, in a writer thread.

Compute never waits on the disk: each finished window is handed to ``WriterThread``,
which casts its rows to the stored dtypes once, appends them to the current part
(committed every ``commit_every_s``) and to the shard file being assembled.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from ..disk import disk_full, disk_full_is_a_user_error, room_for
from ..store.format import VALUE_DTYPES, needed_rows
from ..store.values import SCALE_DATASETS, encode_int8, truncate_top_p
from ..store.writer import ShardWriter
from .parts import CommittedParts, PartWriter, iter_part_rows, read_part_attrs
from .provenance import part_attrs

# A part is built in memory before it is written: cap it (~100 MB at k=64) whatever
# commit_every_s says.
PART_MAX_ROWS = 1 << 18


class PartCommitter:
    """Writes rows into the current part file and commits it every ``commit_every_s``."""

    def __init__(self, parts: CommittedParts, claim, settings):
        self.parts, self.claim, self.settings = parts, claim, settings
        # The engine's description, recorded with the claim (set once it is loaded).
        self.engine = "pipeline"
        self.writer = None
        self.opened_at = 0.0
        self.compute_seconds = 0.0
        self.rows_computed = 0

    def add(self, first_sample: int, first_row: int, num_samples: int, rows: dict, seconds: float):
        if self.writer is None:
            self.writer = PartWriter(
                self.parts.part_path(first_sample),
                first_sample,
                first_row,
                self.settings.store_entropy,
            )
            self.opened_at = time.time()
        with disk_full_is_a_user_error(self.writer.path):
            self.writer.append(num_samples, rows)
        self.compute_seconds += seconds
        self.rows_computed += len(rows["logsumexp"])
        if (
            time.time() - self.opened_at >= self.settings.commit_every_s
            or self.writer.num_rows >= PART_MAX_ROWS
        ):
            self.commit()

    def commit(self) -> None:
        if self.writer is None:
            return
        with disk_full_is_a_user_error(self.writer.path):
            path = self.writer.commit(part_attrs(self.claim, self.compute_seconds, self.engine))
        self.parts.add(path, read_part_attrs(path))
        self.writer, self.compute_seconds = None, 0.0

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class WriterThread:
    """Runs the writing side of a shard in its own thread, so compute never waits on it.

    Jobs run in submission order: committing part files and encoding + compressing
    rows into the shard. A bounded queue makes compute wait only when writing falls
    more than ``depth`` windows behind; an error in a job is raised in the caller
    at its next ``submit`` or at ``close``.
    """

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the main thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job) -> None:
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for every submitted job; raise the first error one of them hit."""
        self._jobs.put(None)
        self._thread.join()
        self._raise()


def rows_in_stored_dtypes(rows: dict, settings) -> dict:
    """Cast (and truncate to ``top_p``, encode as int8) once, so the part files and the
    shard hold the very same bits."""
    out = dict(rows)
    if "topk_logits" in rows:
        if settings.top_p is not None:
            out["topk_ids"], out["topk_logits"] = truncate_top_p(
                rows["topk_ids"], rows["topk_logits"], rows["logsumexp"], settings.top_p
            )
        if settings.value_dtype == "int8":
            codes, top, step = encode_int8(out["topk_logits"])
            out.update(zip(("topk_logits", *SCALE_DATASETS), (codes, top, step)))
        else:
            dtype = VALUE_DTYPES[settings.value_dtype]
            out["topk_logits"] = out["topk_logits"].astype(dtype, copy=False)
    out["entropy"] = rows["entropy"].astype(np.float16, copy=False)
    return out


class ShardSink:
    """Rows to the shard file as they are computed (the live assembly).

    The rows of parts committed by an earlier claim go in first, then each new
    window's; at the end the shard is committed with no copying pass left to do.
    """

    def __init__(
        self,
        writer: ShardWriter,
        input_ids: np.ndarray,
        with_entropy: bool,
        loss_mask: np.ndarray | None = None,
        token_offsets: np.ndarray | None = None,
    ):
        self.writer, self.input_ids, self.with_entropy = writer, input_ids, with_entropy
        self.loss_mask, self.token_offsets = loss_mask, token_offsets

    @property
    def with_text(self) -> bool:
        """Whether the shard takes the cross-tokenizer fields (rows bring target_logprob)."""
        return self.token_offsets is not None

    def add(self, first_row: int, rows: dict) -> None:
        last_row = first_row + len(rows["logsumexp"])
        rows = {**rows, "input_ids": self.input_ids[first_row:last_row]}
        if self.loss_mask is not None:
            rows["loss_mask"] = self.loss_mask[first_row:last_row]
        if self.token_offsets is not None:
            rows["token_offsets"] = self.token_offsets[first_row:last_row]
        if not self.with_entropy:
            rows.pop("entropy", None)
        # libhdf5 can crash on a failed write: stop cleanly while the rows surely fit.
        needed = sum(v.nbytes for v in rows.values()) + 2**16
        if needed > room_for(self.writer.temp_path):
            raise disk_full(self.writer.path, needed)
        with disk_full_is_a_user_error(self.writer.path):
            self.writer.write_rows(rows)

    def replay(self, parts: CommittedParts) -> None:
        for path, part in parts.parts:
            for r0, rows in iter_part_rows(path):
                self.add(int(part["first_row"]) + r0, rows)


def open_shard_writer(
    output, sample_ids, offsets, settings, loss_mask: np.ndarray | None = None, text=None
) -> ShardWriter:
    """``text``: (text_bytes, text_offsets) of the shard's samples: the cross-tokenizer fields."""
    writer = ShardWriter(
        output,
        num_samples=len(sample_ids),
        num_tokens=int(offsets[-1]),
        top_k=settings.top_k,
        value_dtype=settings.value_dtype,
        compression=settings.compression,
        with_entropy=settings.store_entropy,
        with_loss_mask=loss_mask is not None,
        stored_rows=needed_rows(loss_mask, offsets) if settings.store_masked_only else None,
        temperatures=settings.temperatures,
        sampling=settings.sampling,
        text=text,
        # A teacher on the CPU keeps every core busy with its own threads: one compressing
        # thread (GIL-free, beside the writer thread) is then far faster than it needs,
        # where more would stall the teacher's parallel kernels.
        compress_threads=1 if settings.devices.may_compute_on_cpu else None,
    )
    writer.add_samples(sample_ids, np.diff(offsets))
    return writer
