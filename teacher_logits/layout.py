"""Every path of a run, in one place: ``RunLayout(output_dir)``.

Rules (through ``rules/common.smk``), jobs, status, the disk estimate and resume
all ask this module where things are; none of them spells a path pattern itself.
Knows nothing of what is inside the files.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "index.h5"
MANIFEST_NAME = "manifest.json"
# Files are written under this suffix and renamed into place, so no reader ever
# sees half a file.
PARTIAL_SUFFIX = ".partial"


def shard_name(index: int) -> str:
    """The ``{shard}`` wildcard of shard ``index``: five digits."""
    return f"{int(index):05d}"


def partial_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written before its atomic rename."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def export_file(out_dir: str | os.PathLike, shard: int) -> Path:
    """Shard ``shard``'s Parquet file in an export (``teacher-logits export``)."""
    return Path(out_dir) / f"shard_{shard_name(shard)}.parquet"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file so a reader sees the old content or the new, never half."""
    temp = partial_path(path)
    temp.write_text(text)
    os.replace(temp, path)


# A shard's file, its resume parts, its job lock, or its file half-written.
_SHARD_ENTRY = re.compile(r"shard_(\d{5,})\.(h5|parts|lock|h5\.partial)")


def shard_index_of(name: str) -> int | None:
    """The shard a ``shards/`` entry belongs to (``shard_00003.parts`` -> 3), or None."""
    match = _SHARD_ENTRY.fullmatch(name)
    return int(match.group(1)) if match else None


def user_cache_dir(output_dir: str | os.PathLike) -> Path:
    """Where ``status`` keeps its cache of a store it may not write into (a copied or
    read-only store): ``$XDG_CACHE_HOME/teacher-logits/<digest of its absolute path>``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    key = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
    return Path(base) / "teacher-logits" / key


def parts_dir_for(shard_path: str | os.PathLike) -> Path:
    """``shards/shard_00003.h5`` -> ``shards/shard_00003.parts/``: its committed progress."""
    path = Path(shard_path)
    return path.with_name(path.stem + ".parts")


def lock_path_for(shard_path: str | os.PathLike) -> Path:
    """``shards/shard_00003.h5`` -> ``shards/shard_00003.lock``: held while a job writes it."""
    path = Path(shard_path)
    return path.with_name(path.stem + ".lock")


# Inside a shard's parts folder (see ``generation.parts``).
PARTS_META = "meta.json"  # what the committed parts were made with
PARTS_PROGRESS = "progress.json"  # rows done, rewritten at every commit
PARTS_ASSEMBLED = "assembled.h5"  # a hard link to the finished shard
PARTS_ASSEMBLED_RECORD = "assembled.json"  # the finished shard's size when it was written
PART_GLOB = "part_*.h5"


def part_file(parts_dir: str | os.PathLike, first_sample: int) -> Path:
    """The part file whose rows start at sample ``first_sample`` of the shard."""
    return Path(parts_dir) / f"part_{first_sample:010d}.h5"


def progress_path_for(shard_path: str | os.PathLike) -> Path:
    """The small record a generate job rewrites as it commits rows of the shard."""
    return parts_dir_for(shard_path) / PARTS_PROGRESS


def job_record_for(log_path: str | os.PathLike) -> Path:
    """``logs/gather.log`` -> ``logs/gather.job.json``: the job's state, written by the job."""
    path = Path(log_path)
    return path.with_name(path.stem + ".job.json")


def rank_log_for(log_path: str | os.PathLike) -> Path:
    """``logs/generate/shard_00000.log`` -> ``...shard_00000.ranks.log``: what the job's
    tensor-parallel ranks print (tracebacks, library warnings)."""
    path = Path(log_path)
    return path.with_name(path.stem + ".ranks.log")


@dataclass(frozen=True)
class RunLayout:
    output_dir: Path

    def __init__(self, output_dir: str | os.PathLike):
        object.__setattr__(self, "output_dir", Path(output_dir))

    def _path(self, *parts: str) -> Path:
        return self.output_dir.joinpath(*parts)

    # prepare
    @property
    def prepared_dir(self) -> Path:
        return self._path("prepared")

    @property
    def tokens(self) -> Path:
        return self._path("prepared", "tokens.h5")

    @property
    def plan(self) -> Path:
        return self._path("prepared", "plan.json")

    # Rows appended after the first plan are prepared as segments of their own:
    # segment 0 is prepared/tokens.h5 + plan.json, segment j prepared/segment_000j/.
    def segment_wildcard(self, segment: int) -> str:
        """The ``{segment}`` wildcard of a segment: empty for 0, ``/segment_0001`` after."""
        return "" if int(segment) == 0 else f"/segment_{int(segment):04d}"

    def segment_tokens(self, segment: int | str) -> Path:
        """A segment's tokens (the ``{segment}`` wildcard itself for rule patterns)."""
        return self._segment_file(segment, self.tokens.name)

    def segment_plan(self, segment: int | str) -> Path:
        return self._segment_file(segment, self.plan.name)

    @property
    def segment_records_dir(self) -> Path:
        return self._path("prepared", "segments")

    def segment_record(self, segment: int) -> Path:
        """A copy of a segment's ``plan.json`` that Snakemake never deletes: it deletes a
        job's outputs when the job starts (and when it fails), and the segments after one
        being prepared again must still be known."""
        return self.segment_records_dir / f"{int(segment):04d}.json"

    def _segment_file(self, segment: int | str, name: str) -> Path:
        where = segment if isinstance(segment, str) else self.segment_wildcard(segment)
        return Path(f"{self.prepared_dir}{where}") / name

    @property
    def prepare_log_pattern(self) -> str:
        """``logs/prepare.log`` for segment 0, ``logs/prepare/segment_0001.log`` after."""
        return f"{self.log('prepare').with_suffix('')}{{segment}}.log"

    @property
    def regenerate_token(self) -> Path:
        return self._path("prepared", "regenerate.token")

    # generate
    @property
    def shards_dir(self) -> Path:
        return self._path("shards")

    def shard(self, index: int | str) -> Path:
        """Shard ``index`` (an int, or the ``{shard}`` wildcard itself for rule patterns)."""
        name = index if isinstance(index, str) else shard_name(index)
        return self.shards_dir / f"shard_{name}.h5"

    def parts_dir(self, index: int) -> Path:
        return parts_dir_for(self.shard(index))

    def shard_lock(self, index: int) -> Path:
        return lock_path_for(self.shard(index))

    def progress(self, index: int) -> Path:
        return progress_path_for(self.shard(index))

    # gather
    @property
    def index(self) -> Path:
        return self._path(INDEX_NAME)

    @property
    def manifest(self) -> Path:
        return self._path(MANIFEST_NAME)

    @property
    def tokenizer_dir(self) -> Path:
        """A copy of the teacher's tokenizer files, for ``check_tokenizer``."""
        return self._path("tokenizer")

    # distill (the student proof; not part of the default target)
    @property
    def distill_result(self) -> Path:
        return self._path("distill", "distill.json")

    @property
    def distill_figure(self) -> Path:
        return self._path("distill", "distill.png")

    # the run
    @property
    def run_lock(self) -> Path:
        return self._path(".run.lock")

    @property
    def status_checks(self) -> Path:
        """``status``'s quick check of each finished shard, by size, mtime, ctime, inode:
        with the run's own state (prepare's folder), never beside the store's files."""
        return self._path("prepared", ".status_checks.json")

    @property
    def user_status_checks(self) -> Path:
        """The same where the run's state is absent or read-only."""
        return user_cache_dir(self.output_dir) / "status_checks.json"

    @property
    def gather_checks(self) -> Path:
        """Gather's check of each shard, by size, mtime and inode (``store.validation_cache``)."""
        return self._path(".gather_checks.json")

    @property
    def disk_ledger(self) -> Path:
        """The room reserved by running shard jobs (``disk_reservations``)."""
        return self.shards_dir / ".disk_reservations.json"

    @property
    def disk_ledger_lock(self) -> Path:
        return self.shards_dir / ".disk_reservations.lock"

    @property
    def digest_cache(self) -> Path:
        """Content hashes of the dataset's files, by size, mtime, ctime and inode."""
        return self._path(".content_digests.json")

    def log(self, rule: str, shard: int | str | None = None) -> Path:
        """``logs/<rule>.log``, or ``logs/generate/shard_<i>.log`` for a shard's job."""
        if shard is None:
            return self._path("logs", f"{rule}.log")
        name = shard if isinstance(shard, str) else shard_name(shard)
        return self._path("logs", rule, f"shard_{name}.log")

    def benchmark(self, rule: str, shard: str) -> Path:
        return self._path("benchmarks", rule, f"shard_{shard}.tsv")

    def report_figure(self, name: str) -> Path:
        return self._path("report", f"{name}.png")
