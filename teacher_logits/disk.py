"""Disk space: how many bytes a run will take, whether it fits, and a full disk
while writing as one line that says what to do.

The estimate serves the status command (the rest of the run, once ``prepare`` has
written its plan) and every generate job before it claims a GPU (its own shard and
the resume parts it writes beside it); the guard serves every writer: prepare's
tokens and plan, the shards, gather's index and manifest.

The guard has two layers. Before writing, a writer compares what it will write
with the room left (``ensure_room``). While writing HDF5, ``store.writer.GuardedFile``
stands between libhdf5 and the disk: a write that fails is recorded instead of
reaching libhdf5, which can otherwise crash the process (SIGSEGV at exit) after a
failed write; the writer then raises one ``DiskFullError`` line (``disk_full``) and
deletes its ``.partial`` file. No torch.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .disk_reservations import room_ledger
from .errors import DiskFullError
from .layout import RunLayout, partial_path
from .row_bytes import part_bytes_per_token, planned_row, uncompressed_bytes_per_token
from .store.format import CHUNK_ROWS

# Per sample: one int64 sample id and one int64 offset.
SAMPLE_BYTES = 16
# HDF5 metadata, attributes (versions, claims) and checksums of one shard file.
FILE_OVERHEAD_BYTES = 64 * 1024
# A resume part: its attributes and metadata, plus at most one partly filled chunk
# per dataset (parts are uncompressed: a started chunk takes its full size).
PART_OVERHEAD_BYTES = 16 * 1024
# Rows per part assumed when the caller does not say: a part is one or more
# generation windows (batch_tokens x 32 rows), at most 2**18 rows.
DEFAULT_ROWS_PER_PART = 1 << 16
# gather's index.h5: per sample an int64 id, int32 shard, int64 position, int64 length.
INDEX_SAMPLE_BYTES = 28
# A generous upper bound of one shard's entry in manifest.json (claims included).
MANIFEST_SHARD_BYTES = 4096


def parts_bytes(rows: int, per_token: int, rows_per_part: int = DEFAULT_ROWS_PER_PART) -> int:
    """Disk taken by the resume parts of ``rows`` rows: uncompressed, each part's last chunk
    allocated in full. They are deleted once their shard is written."""
    if rows <= 0:
        return 0
    parts = -(-rows // max(1, rows_per_part))
    return (rows + parts * CHUNK_ROWS) * per_token + parts * PART_OVERHEAD_BYTES


def gather_bytes(num_samples: int, num_shards: int, plan_bytes: int) -> tuple[int, int]:
    """Upper bounds of gather's (index.h5, manifest.json); the manifest repeats the plan
    (``plan_bytes``: dropped samples, settings) and adds each shard's entry."""
    index = num_samples * INDEX_SAMPLE_BYTES + num_shards * 256 + FILE_OVERHEAD_BYTES // 4
    return index, plan_bytes + num_shards * MANIFEST_SHARD_BYTES


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent, so it
    works before the folder exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def file_size_limit() -> float:
    """The largest file this process may write (ulimit -f), or infinity."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return float("inf") if soft == resource.RLIM_INFINITY else soft


def room_for(growing: Path) -> int:
    """Bytes ``growing``, a file being written, may still take: free disk, or less where a
    file-size limit leaves less."""
    size = growing.stat().st_size if growing.exists() else 0
    return int(min(free_bytes(growing.parent), file_size_limit() - size))


def finished_shard_sizes(layout: RunLayout, plan: dict, shards=None) -> tuple[int, int]:
    """(bytes, tokens) over the shards already written (of ``shards``, default all): the
    compression this run really gets."""
    total_bytes = total_tokens = 0
    for shard in plan["shards"]:
        if shards is not None and int(shard["index"]) not in shards:
            continue
        path = layout.shard(int(shard["index"]))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        total_bytes += size
        total_tokens += int(shard["num_tokens"])
    return total_bytes, total_tokens


@dataclass
class Estimate:
    bytes_per_token: float
    measured: bool  # from finished shards; else the uncompressed upper bound

    @property
    def basis(self) -> str:
        if self.measured:
            return "measured on the finished shards"
        return "upper bound before compression"

    def shard_bytes(self, num_tokens: int, num_samples: int) -> int:
        if self.measured:
            return int(num_tokens * self.bytes_per_token + num_samples * SAMPLE_BYTES)
        return int(
            allocated_rows(num_tokens) * self.bytes_per_token
            + num_samples * SAMPLE_BYTES
            + FILE_OVERHEAD_BYTES
        )


def allocated_rows(num_tokens: int) -> int:
    """Token rows HDF5 allocates: whole chunks, so the last one counts in full uncompressed."""
    chunk = max(1, min(CHUNK_ROWS, num_tokens))
    return -(-num_tokens // chunk) * chunk


def storage_settings(
    plan: dict, value_dtype: str | None = None, store_entropy: bool | None = None
) -> tuple[str, bool]:
    """(value_dtype, store_entropy): the caller's, else the plan's."""
    settings = plan.get("settings", {})
    if value_dtype is None:
        value_dtype = settings.get("storage", {}).get("value_dtype", "float32")
    if store_entropy is None:
        store_entropy = settings.get("generation", {}).get("store_entropy", True)
    return value_dtype, bool(store_entropy)


def bytes_per_token(
    plan: dict,
    layout: RunLayout,
    value_dtype: str | None = None,
    store_entropy: bool | None = None,
    shards=None,
) -> Estimate:
    """Bytes per token in a shard: measured once a shard is finished (those in ``shards``,
    default all), else the uncompressed size.

    Compression (zstd by default) typically stores a top-k row in well under half
    its raw size, but how much depends on the teacher; the first shard tells.
    """
    written, tokens = finished_shard_sizes(layout, plan, shards)
    if tokens:
        return Estimate(written / tokens, measured=True)
    value_dtype, store_entropy = storage_settings(plan, value_dtype, store_entropy)
    raw = uncompressed_bytes_per_token(
        int(plan["top_k"]), value_dtype, store_entropy, **planned_row(plan)
    )
    if "loss_mask" in plan:  # chat data: one uint8 per token more
        raw += 1
    return Estimate(float(raw), measured=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover - the loop returns at TB


def committed_rows(layout: RunLayout, shard: int) -> int:
    """Rows of the shard already in committed resume parts (their disk is already taken)."""
    try:
        return int(json.loads(layout.progress(shard).read_text()).get("rows_done", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def check_shard_fits(
    layout: RunLayout,
    plan: dict,
    shard: int,
    value_dtype: str,
    store_entropy: bool,
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
) -> None:
    """Refuse to start a shard whose job cannot fit in the free space of its folder less
    what other running jobs reserved; else reserve its room while the caller holds the
    shard's job lock (``disk_reservations``).

    The job writes the shard (compressed) and, beside it, resume parts holding the same
    rows uncompressed (about 4x the shard's size at top_k=64); the parts are deleted
    only once the shard is complete, so both must fit at once.
    """
    output = layout.shard(shard)
    entry = plan["shards"][shard]
    num_tokens = int(entry["num_tokens"])
    estimate = bytes_per_token(plan, layout, value_dtype, store_entropy)
    shard_need = estimate.shard_bytes(num_tokens, int(entry["num_samples"]))
    per_row = part_bytes_per_token(
        int(plan["top_k"]), value_dtype, store_entropy, **planned_row(plan)
    )
    parts_need = parts_bytes(num_tokens - committed_rows(layout, shard), per_row, rows_per_part)
    needed = shard_need + parts_need
    with room_ledger(layout) as ledger:
        free = free_bytes(output.parent)
        partial = partial_path(output)
        if partial.exists():  # a killed attempt's file is overwritten: its space counts as free
            free += partial.stat().st_size
        others = ledger.reserved_by_others(shard)
        taken = sum(others.values())
        if needed > free - taken:
            busy = ", ".join(str(s) for s in sorted(others) if others[s])
            also = f", of which running jobs (shards {busy}) still need {human_bytes(taken)}"
            raise DiskFullError(
                f"disk full: shard {shard} needs about {human_bytes(needed)} ({needed} bytes: "
                f"{human_bytes(shard_need)} for the shard, {estimate.basis}, and "
                f"{human_bytes(parts_need)} for its resume parts, {per_row} bytes/token "
                f"uncompressed, deleted once the shard is written) but only {human_bytes(free)} "
                f"({free} bytes) are free under {output.parent}{also if taken else ''}; free "
                "some space or point output_dir at a bigger disk, then rerun"
            )
        with disk_full_is_a_user_error(layout.disk_ledger):
            ledger.record(shard, needed, others)


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# libhdf5 reports a failed write through h5py with the OS error only in its message.
DISK_FULL_WORDS = ("No space left", "Disk quota", "File too large", "errno = 28", "errno = 27")


DEFAULT_FIX = (
    "free space or move output_dir, then rerun the same command (committed parts and "
    "finished shards are kept)"
)


def room_text(path: Path, room: int | None = None) -> str:
    """How much may still be written at ``path``: free disk, or what a file-size limit leaves
    (``room``, when the caller measured it)."""
    free, limit = free_bytes(path.parent), file_size_limit()
    if limit < free:
        left = f"only {human_bytes(room)} more may be written to it" if room is not None else ""
        return (
            f"{left or 'no more may be written to it'} (ulimit -f: {human_bytes(limit)} per file)"
        )
    return f"{human_bytes(free)} free there"


def disk_full(
    path: Path,
    needed: int | None = None,
    fix: str = DEFAULT_FIX,
    why: str = "",
    room: int | None = None,
) -> DiskFullError:
    """The one line a full disk is reported with: the path, what it needed, what is free."""
    path = Path(path)
    need = f"it needs about {human_bytes(needed)} more ({needed} bytes), " if needed else ""
    why = f" ({why})" if why else ""
    return DiskFullError(
        f"disk full while writing {path}{why}: {need}{room_text(path, room)}; {fix}"
    )


def ensure_room(
    path: Path,
    needed: int,
    target: Path | None = None,
    fix: str = DEFAULT_FIX,
    alongside: int = 0,
):
    """Refuse, before writing, ``needed`` more bytes into ``path`` (a file being written)
    that the disk or the file-size limit cannot take, when ``alongside`` bytes go to other
    files of the same folder as well; ``target`` is named in the error."""
    room = min(room_for(Path(path)), free_bytes(Path(path).parent) - alongside)
    if needed > room:
        raise disk_full(target or path, needed, fix, room=max(0, room))


def full_disk_cause(exc: BaseException | None) -> BaseException | None:
    """The full-disk error behind ``exc`` (itself, or what caused it), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if isinstance(exc, (OSError, RuntimeError)) and any(w in str(exc) for w in DISK_FULL_WORDS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def disk_full_is_a_user_error(path: Path, fix: str = DEFAULT_FIX):
    """Turn a full disk (or a file-size limit) into one line that says what to do: also one
    behind another error (a library that wraps the OSError). A ``DiskFullError`` passes."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        cause = full_disk_cause(exc)
        if cause is None:
            raise
        raise disk_full(Path(path), fix=fix, why=_errno_text(cause)) from None


def _errno_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return next((w for w in DISK_FULL_WORDS if w in str(exc)), "")


def write_text_guarded(path: str | os.PathLike, text: str, rename: bool = True) -> Path:
    """Write ``text`` to ``path``'s ``.partial`` file and rename it into place (or leave the
    rename to the caller, ``rename=False``: the ``.partial`` path is returned). A full disk
    raises ``DiskFullError`` and leaves no ``.partial`` behind."""
    path = Path(path)
    temp = partial_path(path)
    data = text.encode()
    ensure_room(temp, len(data), target=path)
    try:
        with disk_full_is_a_user_error(path):
            with open(temp, "wb") as handle:
                handle.write(data)
        if rename:
            os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path if rename else temp


def run_needs(layout: RunLayout, plan: dict, shards: list, done: set, running: int) -> dict:
    """What the rest of the run writes at its peak: the shards still to make, plus the
    resume parts (uncompressed) of as many shards as run at once (those running now, at
    least one); each shard's parts are deleted when it finishes."""
    estimate = bytes_per_token(plan, layout, shards=done)
    per_row = part_bytes_per_token(int(plan["top_k"]), *storage_settings(plan), **planned_row(plan))
    todo = [s for s in shards if s["state"] != "done"]
    shard_need = 0
    for s in todo:  # a shard being written already has part of its file on disk
        written = partial_path(layout.shard(s["index"]))
        already = written.stat().st_size if written.exists() else 0
        shard_need += max(0, estimate.shard_bytes(s["num_tokens"], s["num_samples"]) - already)
    parts = sorted(
        (
            parts_bytes(s["num_tokens"] - min(s["rows_done"], s["num_tokens"]), per_row)
            for s in todo
        ),
        reverse=True,
    )
    at_once = max(1, running)
    parts_need = sum(parts[:at_once])
    return {
        "bytes_per_token": estimate.bytes_per_token,
        "basis": estimate.basis,
        "total_bytes": sum(estimate.shard_bytes(s["num_tokens"], s["num_samples"]) for s in shards),
        "remaining_shard_bytes": shard_need,
        "parts_bytes_per_token": per_row,
        "parts_bytes": parts_need,
        "parts_shards_at_once": at_once,
        "gather_bytes": 0,
        "remaining_bytes": shard_need + parts_need,
    }


def render_disk(disk: dict, free: int, out_dir: str) -> list[str]:
    parts = ""
    if disk["parts_bytes"]:
        at_once = disk["parts_shards_at_once"]
        parts = (
            f" + {human_bytes(disk['parts_bytes'])} of resume parts ("
            f"{disk['parts_bytes_per_token']} bytes/token uncompressed, "
            f"{at_once} shard{'s' if at_once > 1 else ''} at a time, deleted as each finishes)"
        )
    gather = f" + {human_bytes(disk['gather_bytes'])} for gather" if disk["gather_bytes"] else ""
    left = (
        f"still to write at the peak: {human_bytes(disk['remaining_shard_bytes'])} of shards"
        f"{parts}{gather} = {human_bytes(disk['remaining_bytes'])}"
        if disk["remaining_bytes"]
        else "nothing left to write"
    )
    lines = [
        f"  disk: {human_bytes(disk['total_bytes'])} of shards for the whole run at "
        f"{disk['bytes_per_token']:.0f} bytes/token ({disk['basis']}); {left}; "
        f"{human_bytes(free)} free"
    ]
    if not disk["fits"]:
        lines.append(
            f"  WARNING: not enough disk: the rest of the run needs about "
            f"{human_bytes(disk['remaining_bytes'])} at its peak but only {human_bytes(free)} "
            f"are free under {out_dir}; free space or move output_dir before running on, "
            "or its jobs will stop with 'disk full'"
        )
    return lines
