"""A shard's committed progress: its part files, whether they still belong to this
run's teacher and config, and the lock that keeps two jobs off one shard.

Plain Python (no torch, no Snakemake). The part files themselves are written and
read through ``shard_format``; this module decides which of them may be kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .shard_format import ShardError, read_part_attrs, temp_path_for

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
    "shard_plan": "the shard's samples changed (prepare ran again with other data)",
    "regenerate_token": "a regeneration was requested (force_regenerate=true)",
}


def parts_dir_for(shard_path: str | os.PathLike) -> Path:
    """``shards/shard_00003.h5`` -> ``shards/shard_00003.parts/``."""
    path = Path(shard_path)
    return path.with_name(path.stem + ".parts")


def lock_path_for(output: str | os.PathLike) -> Path:
    """``shards/shard_00003.h5`` -> ``shards/shard_00003.lock`` (held while a job writes it)."""
    path = Path(output)
    return path.with_name(path.stem + ".lock")


@contextmanager
def job_lock(output: str | os.PathLike, poll_s: float = 10.0):
    """Hold the lock of a job's output; wait (logging who holds it) while another job has it.

    A job orphaned by a killed Snakemake process may still be writing this output;
    the kernel drops its lock when it exits, so a stale lock never blocks a rerun.
    """
    path = lock_path_for(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    handle.seek(0)
                    holder = handle.read().strip() or "another job"
                    log.warning("%s is held by %s; waiting for it to finish", path.name, holder)
                    waited = True
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
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
        return self.directory / "meta.json"

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found = sorted(self.directory.glob("part_*.h5"))
        reason = self._identity_mismatch()
        if reason and found:
            log.warning(
                "discarding %d committed part(s) of %s from an earlier run: %s; starting this "
                "shard from zero", len(found), self.directory.name, reason,
            )
            self.discard_all()
            found = []
        self._write_meta()
        for stale in self.directory.glob("*.partial"):
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
                self.directory.name, len(self.parts), self.rows_done, self.rows_total,
            )
        self.write_progress()

    def _identity_mismatch(self) -> str | None:
        try:
            stored = json.loads(self._meta_path().read_text())
        except (OSError, ValueError):
            return "their record of the run that wrote them is missing or unreadable"
        changed = [k for k in self.identity if stored.get(k) != self.identity[k]]
        return "; ".join(IDENTITY_REASONS.get(k, f"{k} changed") for k in changed) or None

    def _drop_from(self, paths: list[Path], why: str) -> None:
        log.warning("discarding %d part(s) from %s on: %s", len(paths), paths[0].name, why)
        for path in paths:
            path.unlink(missing_ok=True)

    def _write_meta(self) -> None:
        atomic_write_text(self._meta_path(), json.dumps(self.identity, indent=1, sort_keys=True))

    @property
    def assembled_path(self) -> Path:
        return self.directory / "assembled.h5"

    def keep_assembled(self, shard_path: Path) -> None:
        """Swap the committed parts for a hard link to the finished shard.

        Snakemake records a job as done only after the job exits; a kill in between
        marks the finished shard incomplete and the next run deletes it. The link
        keeps the rows (at no disk cost) so that run reuses them instead of
        computing the shard again. Gather removes the parts folders once it succeeds.
        """
        self.assembled_path.unlink(missing_ok=True)
        try:
            os.link(shard_path, self.assembled_path)
        except OSError:  # a filesystem without hard links: keep nothing, lose little
            pass
        for path, _ in self.parts:
            path.unlink(missing_ok=True)
        self.parts = []

    def take_assembled(self, shard_path: Path, is_valid) -> bool:
        """Put back a shard an earlier job finished, if ``is_valid(path)`` accepts it."""
        if not self.assembled_path.exists():
            return False
        if not is_valid(self.assembled_path):
            log.warning("discarding the earlier assembled copy of %s: it failed validation",
                        shard_path.name)
            self.assembled_path.unlink()
            return False
        temp = temp_path_for(shard_path)
        temp.unlink(missing_ok=True)
        os.link(self.assembled_path, temp)
        os.replace(temp, shard_path)
        log.info("%s was finished by an earlier job (killed before Snakemake recorded it); "
                 "reusing it", shard_path.name)
        return True

    def part_path(self, first_sample: int) -> Path:
        return self.directory / f"part_{first_sample:010d}.h5"

    def add(self, path: Path, attrs: dict) -> None:
        self.parts.append((path, attrs))
        self.write_progress()

    def write_progress(self) -> None:
        progress = {"rows_done": self.rows_done, "rows_total": self.rows_total,
                    "updated_at": time.time()}
        atomic_write_text(self.directory / "progress.json", json.dumps(progress))

    def discard_all(self) -> None:
        for path in list(self.directory.iterdir()):
            if path.is_file():
                path.unlink()
        self.parts = []



def remove_parts_dirs(shard_paths) -> None:
    """Drop every shard's parts folder: called once the gathered store is complete."""
    for shard_path in shard_paths:
        shutil.rmtree(parts_dir_for(shard_path), ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    temp = temp_path_for(path)
    temp.write_text(text)
    os.replace(temp, path)


def claims_from_parts(parts: list[dict]) -> list[dict]:
    """One record per GPU-group claim that committed rows, in order (consecutive parts merge)."""
    claims: list[dict] = []
    for attrs in parts:
        key = (attrs["claim_hostname"], attrs["claim_cuda_visible_devices"], attrs["claim_started_at"])
        if claims and claims[-1]["_key"] == key:
            claims[-1]["finished_at"] = float(attrs["committed_at"])
            claims[-1]["rows"] += int(attrs["num_rows"])
            continue
        claims.append({
            "_key": key,
            "cuda_visible_devices": attrs["claim_cuda_visible_devices"],
            "hostname": attrs["claim_hostname"],
            "started_at": float(attrs["claim_started_at"]),
            "finished_at": float(attrs["committed_at"]),
            "rows": int(attrs["num_rows"]),
        })
        if attrs.get("claim_scheduler_job_id"):
            claims[-1]["scheduler_job_id"] = attrs["claim_scheduler_job_id"]
    for claim in claims:
        del claim["_key"]
    return claims
