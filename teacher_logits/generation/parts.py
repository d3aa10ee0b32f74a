"""A shard's committed progress: its part files, whether they still belong to this
run's teacher and config, and the lock that keeps two jobs off one shard.

HDF5 is not crash-safe, so a generation job never resumes writing a half-written
file. It writes its rows into small part files instead, each made durable with
fsync + rename once about ``commit_every_s`` of work is in it; a resumed job keeps
the committed parts and continues after the last one. The finished shard is
assembled from the parts. Parts are uncompressed (fast to write, read once) and
hold values already in the stored dtype, so assembly is a pure copy.

Plain Python, numpy and h5py (no torch, no Snakemake).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ..errors import ShardError
from ..layout import (
    PART_GLOB,
    PARTIAL_SUFFIX,
    PARTS_ASSEMBLED,
    PARTS_ASSEMBLED_RECORD,
    PARTS_META,
    PARTS_PROGRESS,
    atomic_write_text,
    lock_path_for,
    part_file,
    partial_path,
    parts_dir_for,
)
from ..locks import OUTPUT_DIR_FIX, holder_line, try_lock
from ..shard_records import record_written_shard
from ..store.format import CHUNK_ROWS, fsync_dir, is_row_dataset, read_attrs

log = logging.getLogger(__name__)

# What a resumed job must share with the job that committed the parts, and how a
# mismatch is explained in the log.
IDENTITY_REASONS = {
    "format_version": "the shard format changed",
    "teacher_fingerprint": "the teacher changed",
    "tokenizer_fingerprint": "the tokenizer changed",
    "config_fingerprint": "settings that change the stored numbers changed",
    "top_k": "top_k changed",
    "value_dtype": "storage.value_dtype changed",
    "store_entropy": "generation.store_entropy changed",
    "temperatures": "generation.temperatures changed",
    "cross_tokenizer_fields": "the cross-tokenizer fields are now stored, or no longer",
    "teacher_content_digest": "the teacher's files changed (weights, config, tokenizer or code)",
    "shard_plan": "the shard's samples changed (prepare ran again with other data)",
    "tokens_digest": "the shard's token ids changed (the dataset or its tokenization was edited)",
    "regenerate_token": "a regeneration was requested (force_regenerate=true)",
}
# Identity keys added later, and the value parts committed before them were made with.
IDENTITY_DEFAULTS = {"temperatures": [1.0], "cross_tokenizer_fields": False}
# Keys whose change makes committed parts unusable (their rows would mix with rows of
# another kind) but not the finished copy: a store may mix shards with and without them,
# and the copy is validated before it is taken back.
PARTS_ONLY = {"cross_tokenizer_fields"}


@contextmanager
def job_lock(output: str | os.PathLike, poll_s: float = 10.0):
    """Hold the lock of a job's output; wait (logging who holds it) while another job has it.

    A job orphaned by a killed Snakemake process may still be writing this output;
    the kernel drops its lock when it exits, so a stale lock never blocks a rerun.
    A filesystem whose flock fails in another way raises ``LockError``.
    """
    path = lock_path_for(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        waited = False
        while not try_lock(handle, path, OUTPUT_DIR_FIX):
            if not waited:
                handle.seek(0)
                holder = handle.read().strip() or "another job"
                log.warning("%s is held by %s; waiting for it to finish", path.name, holder)
                waited = True
            time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(holder_line() + "\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # closing releases the lock


class CommittedParts:
    """The committed part files of one shard, in order and without gaps.

    On open, parts from a run with another identity (teacher, tokenizer, config,
    shard plan, a requested regeneration) are discarded with a log line saying
    why; so are temp files a killed job left and anything after a gap or an
    unreadable part.
    """

    def __init__(self, directory: str | os.PathLike, identity: dict, rows_total: int):
        self.directory = Path(directory)
        self.identity = identity
        self.rows_total = rows_total
        self.parts: list[tuple[Path, dict]] = []
        self._open()

    @property
    def samples_done(self) -> int:
        return sum(int(a["num_samples"]) for _, a in self.parts)

    @property
    def rows_done(self) -> int:
        return sum(int(a["num_rows"]) for _, a in self.parts)

    def _meta_path(self) -> Path:
        return self.directory / PARTS_META

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found = sorted(self.directory.glob(PART_GLOB))
        changed = self._identity_changes()
        reason = self._describe(changed)
        if isinstance(changed, list) and changed and set(changed) <= PARTS_ONLY and found:
            self._drop_from(found, reason)
            found = []
        elif reason and (found or self.assembled_path.exists()):
            earlier = [f"{len(found)} committed part(s)"] if found else []
            earlier += ["the finished copy"] if self.assembled_path.exists() else []
            log.warning(
                "discarding %s of %s from an earlier run: %s; starting this shard from zero",
                " and ".join(earlier),
                self.directory.name,
                reason,
            )
            self.discard_all()
            found = []
        self._write_meta()
        for stale in self.directory.glob(f"*{PARTIAL_SUFFIX}"):
            stale.unlink()  # a killed job's uncommitted rows
        next_sample = 0
        for position, path in enumerate(found):
            try:
                attrs = read_part_attrs(path)
            except ShardError as exc:
                self._drop_from(found[position:], f"{exc}")
                break
            if int(attrs["first_sample"]) != next_sample:
                self._drop_from(found[position:], f"a gap before {path.name}")
                break
            self.parts.append((path, attrs))
            next_sample += int(attrs["num_samples"])
        if self.parts:
            log.info(
                "resuming %s: %d committed part(s), %d of %d rows done",
                self.directory.name,
                len(self.parts),
                self.rows_done,
                self.rows_total,
            )
        self.write_progress()

    def _identity_changes(self) -> list[str] | str:
        """The identity keys whose recorded value differs, or why nothing usable is recorded."""
        try:
            stored = json.loads(self._meta_path().read_text())
        except (OSError, ValueError):
            return "their record of the run that wrote them is missing or unreadable"
        if any(key not in stored and key not in IDENTITY_DEFAULTS for key in self.identity):
            return "an older version of this workflow made them, without the records it now checks"
        return [
            k for k in self.identity if stored.get(k, IDENTITY_DEFAULTS.get(k)) != self.identity[k]
        ]

    @staticmethod
    def _describe(changed: list[str] | str) -> str | None:
        if isinstance(changed, str):
            return changed
        return "; ".join(IDENTITY_REASONS.get(k, f"{k} changed") for k in changed) or None

    def _drop_from(self, paths: list[Path], why: str) -> None:
        log.warning("discarding %d part(s) from %s on: %s", len(paths), paths[0].name, why)
        for path in paths:
            path.unlink(missing_ok=True)

    def _write_meta(self) -> None:
        atomic_write_text(self._meta_path(), json.dumps(self.identity, indent=1, sort_keys=True))

    @property
    def assembled_path(self) -> Path:
        return self.directory / PARTS_ASSEMBLED

    def keep_assembled(self, shard_path: Path) -> None:
        """Swap the committed parts for a hard link to the finished shard.

        Snakemake records a job as done only after the job exits; a kill in between
        marks the finished shard incomplete and the next run deletes it. The link
        keeps the rows (at no disk cost) so that run reuses them instead of
        computing the shard again. The link outlives gather: when prepare runs again
        (a timestamp moved, or another shard's data changed), Snakemake reruns every
        shard's job, and each takes its shard back if it still validates.
        """
        self.assembled_path.unlink(missing_ok=True)
        try:
            os.link(shard_path, self.assembled_path)
        except OSError:  # a filesystem without hard links: keep nothing, lose little
            pass
        record_written_shard(shard_path)
        for path, _ in self.parts:
            path.unlink(missing_ok=True)
        self.parts = []

    def take_assembled(self, shard_path: Path, is_valid) -> bool:
        """Put back a shard an earlier job finished, if ``is_valid(path)`` accepts it."""
        if not self.assembled_path.exists():
            return False
        if not is_valid(self.assembled_path):
            log.warning(
                "discarding the finished copy of %s an earlier job wrote: it failed validation "
                "(truncated or changed since); computing the shard again",
                shard_path.name,
            )
            self.assembled_path.unlink()
            return False
        temp = partial_path(shard_path)
        temp.unlink(missing_ok=True)
        os.link(self.assembled_path, temp)
        os.replace(temp, shard_path)
        log.info(
            "%s: reusing the copy an earlier job finished (same teacher, settings and tokens, "
            "and it validates)",
            shard_path.name,
        )
        return True

    def part_path(self, first_sample: int) -> Path:
        return part_file(self.directory, first_sample)

    def add(self, path: Path, attrs: dict) -> None:
        self.parts.append((path, attrs))
        self.write_progress()

    def write_progress(self) -> None:
        progress = {
            "rows_done": self.rows_done,
            "rows_total": self.rows_total,
            "updated_at": time.time(),
        }
        atomic_write_text(self.directory / PARTS_PROGRESS, json.dumps(progress))

    def discard_all(self) -> None:
        for path in list(self.directory.iterdir()):
            if path.is_file():
                path.unlink()
        self.parts = []


def remove_parts_dirs(shard_paths, keep_finished: bool = True) -> None:
    """Drop the resume files of these shards (once the gathered store is complete); each
    shard's kept copy (a hard link, no disk cost) and its size record stay unless
    ``keep_finished`` is false (the shard is to be computed again from zero)."""
    keep = {PARTS_ASSEMBLED, PARTS_ASSEMBLED_RECORD, PARTS_META}
    for shard_path in shard_paths:
        directory = parts_dir_for(shard_path)
        if not keep_finished or not (directory / PARTS_ASSEMBLED).exists():
            shutil.rmtree(directory, ignore_errors=True)
            continue
        for path in directory.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)


# Rows a part is read back in while a shard is assembled.
PART_READ_BLOCK_ROWS = 1 << 16


class PartWriter:
    """Rows of consecutive whole samples, appended window by window, then committed.

    The part is built in memory and written with plain file I/O: a full disk then
    raises a clean ``OSError`` instead of failing inside libhdf5, which can crash
    the process on a failed write.
    """

    def __init__(self, path, first_sample: int, first_row: int, with_entropy: bool = True):
        self.path = Path(path)
        self.temp_path = partial_path(self.path)
        self.first_sample, self.first_row = first_sample, first_row
        self.num_samples = self.num_rows = 0
        self._buffer = io.BytesIO()
        self._file = h5py.File(self._buffer, "w")
        self._with_entropy = with_entropy

    def _create(self, arrays: dict) -> None:
        """The part's row datasets, in the dtypes and widths of the first rows (already
        cast to the shard's stored dtypes by ``rows_in_stored_dtypes``)."""
        for name, values in arrays.items():
            if not is_row_dataset(name) or (name == "entropy" and not self._with_entropy):
                continue
            trailing = tuple(np.shape(values)[1:])
            self._file.create_dataset(
                name,
                shape=(0, *trailing),
                maxshape=(None, *trailing),
                chunks=(CHUNK_ROWS, *trailing),
                dtype=np.asarray(values).dtype,
                fletcher32=True,
            )

    def append(self, num_samples: int, arrays: dict) -> None:
        rows = len(arrays["logsumexp"])
        if not len(self._file):
            self._create(arrays)
        missing = [n for n in arrays if is_row_dataset(n) and n not in self._file]
        if missing and not (missing == ["entropy"] and not self._with_entropy):
            raise ShardError(f"part rows carry {missing}, which its first rows did not")
        for name in self._file:
            if is_row_dataset(name):
                ds = self._file[name]
                ds.resize(self.num_rows + rows, axis=0)
                ds[self.num_rows :] = arrays[name]
        self.num_samples += num_samples
        self.num_rows += rows

    def commit(self, attrs: dict) -> Path:
        f = self._file
        f.attrs.update(
            {
                "first_sample": self.first_sample,
                "num_samples": self.num_samples,
                "first_row": self.first_row,
                "num_rows": self.num_rows,
            }
        )
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
        with h5py.File(path, "r", locking=False) as f:
            attrs = read_attrs(f)
            for name in f:
                if is_row_dataset(name) and f[name].shape[0] != attrs["num_rows"]:
                    raise ShardError(f"part {path}: dataset {name} has the wrong length")
            return attrs
    except (OSError, KeyError) as exc:
        raise ShardError(f"part {path} is unreadable ({exc})") from None


def iter_part_rows(path: str | os.PathLike, block_rows: int = PART_READ_BLOCK_ROWS):
    """A committed part's rows in blocks: ``(first_row_in_part, {dataset: array})``."""
    with h5py.File(path, "r", locking=False) as f:
        names = [n for n in f if is_row_dataset(n)]
        total = f["logsumexp"].shape[0]
        for r0 in range(0, total, block_rows):
            yield r0, {n: f[n][r0 : r0 + block_rows] for n in names}
