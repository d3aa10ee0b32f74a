"""GPU groups: the one device plan of a run, and claiming a group of it.

``device_plan(config)`` is the only code that reads ``gpus``: it resolves the
mode (cpu / local / scheduler) and the groups once, at plan time and in every
job alike. Plain Python (no Snakemake, no torch) so plan time stays fast.

A claim is a set of ``fcntl.flock`` locks, one per physical GPU, in a machine-wide
directory. The kernel drops a flock when its holder dies, so a SIGKILLed job can
never leave a group blocked. Locks are keyed on the physical id (the entry of the
inherited ``CUDA_VISIBLE_DEVICES`` mask, or the plain index when there is none),
so two workflows on one machine never share a GPU. A lock directory whose flock fails
(a network mount without lock support) stops the job with one ``LockError`` line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GpuConfigError, LockError
from .locks import lock_error, try_lock

DEFAULT_LOCK_DIR = "/tmp/teacher-logits-gpu-locks"
LOCK_DIR_ENV = "TEACHER_LOGITS_GPU_LOCK_DIR"
GPU_LOCK_FIX = (
    f"set {LOCK_DIR_ENV} to a folder on a local disk of this machine (one folder for "
    "every workflow that shares its GPUs), or use gpu_assignment: scheduler when a "
    "cluster scheduler gives each job its GPUs"
)

log = logging.getLogger(__name__)


def parse_gpus(value) -> list[int]:
    """Turn every form Snakemake's ``--config`` and YAML produce into a list of ints.

    ``"0,1,2,3"`` (string), ``0`` (int), ``['0', '1']`` (list from ``gpus=[0,1]``),
    a YAML list, or empty (``""``, ``None``, ``[]``) meaning CPU mode.
    """
    if value is None:
        return []
    if isinstance(value, bool):
        raise GpuConfigError(
            f"gpus={value!r} is not a GPU list; give GPU ids like gpus=0,1,2,3, or gpus= for CPU"
        )
    if isinstance(value, int):
        items: Sequence = [value]
    elif isinstance(value, str):
        text = value.strip().strip("[]")
        items = [part for part in re.split(r"[,\s]+", text) if part]
    elif isinstance(value, (list, tuple)):
        items = []
        for entry in value:
            # --config gpus=[0,1] can arrive as ['[0', '1]'] depending on quoting.
            if isinstance(entry, str):
                items.extend(p for p in re.split(r"[,\s\[\]]+", entry) if p)
            else:
                items.append(entry)
    else:
        raise GpuConfigError(
            f"gpus={value!r} has type {type(value).__name__}; give GPU ids like gpus=0,1,2,3"
        )

    ids: list[int] = []
    for item in items:
        if isinstance(item, bool) or not _is_int_like(item):
            raise GpuConfigError(
                f"gpus: {item!r} is not an integer GPU id; give integer ids like gpus=0,1,2,3"
            )
        gpu = int(item)
        if gpu < 0:
            raise GpuConfigError(f"gpus: {gpu} is negative; GPU ids start at 0 (gpus=0,1,2,3)")
        ids.append(gpu)

    duplicates = sorted({g for g in ids if ids.count(g) > 1})
    if duplicates:
        raise GpuConfigError(
            f"gpus: id(s) {duplicates} listed more than once in {ids}; list each GPU once"
        )
    return ids


def _is_int_like(item) -> bool:
    if isinstance(item, int):
        return True
    return isinstance(item, str) and re.fullmatch(r"\s*\d+\s*", item) is not None


def build_groups(gpu_ids: Sequence[int], gpus_per_model) -> list[tuple[int, ...]]:
    """Consecutive slices: ``[0,1,2,3]`` with 2 per model gives ``[(0,1), (2,3)]``."""
    if isinstance(gpus_per_model, bool) or not _is_int_like(gpus_per_model):
        raise GpuConfigError(
            f"gpus_per_model={gpus_per_model!r} is not an integer; give e.g. gpus_per_model=2"
        )
    per_model = int(gpus_per_model)
    if per_model < 1:
        raise GpuConfigError(f"gpus_per_model={per_model} must be at least 1")
    if not gpu_ids:
        return []
    if len(gpu_ids) % per_model:
        usable = len(gpu_ids) - len(gpu_ids) % per_model
        suggestion = ",".join(str(g) for g in gpu_ids[:usable]) or "<more GPUs>"
        raise GpuConfigError(
            f"{len(gpu_ids)} GPUs ({','.join(map(str, gpu_ids))}) do not divide into groups of "
            f"gpus_per_model={per_model}; list a multiple of {per_model} GPUs "
            f"(e.g. gpus={suggestion}) or change gpus_per_model"
        )
    return [tuple(gpu_ids[i : i + per_model]) for i in range(0, len(gpu_ids), per_model)]


def resolve_gpu_assignment(value: str, under_cluster_executor: bool) -> str:
    """``auto`` is ``scheduler`` under a cluster executor, else ``local``.

    A plain local run inside one big ``sbatch`` allocation stays ``local``: it
    splits the allocation's GPUs into groups itself.
    """
    if value == "auto":
        return "scheduler" if under_cluster_executor else "local"
    return value


@dataclass(frozen=True)
class DevicePlan:
    """Where generate jobs run: ``mode`` is ``cpu``, ``local`` (claim one of ``groups``
    with a lock) or ``scheduler`` (keep the GPUs the cluster gave the job)."""

    mode: str
    groups: tuple[tuple[int, ...], ...]
    gpus_per_model: int
    allow_cpu: bool = False

    @property
    def wants_gpu(self) -> bool:
        return self.mode != "cpu"

    @property
    def may_compute_on_cpu(self) -> bool:
        """CPU mode, or GPU groups with ``allow_cpu`` (tests, CPU fallback)."""
        return self.mode == "cpu" or self.allow_cpu

    @property
    def gpus_per_job(self) -> int:
        """The ``gpu`` resource of one generate job (a scheduler is always asked for GPUs)."""
        return self.gpus_per_model if self.wants_gpu else 0

    @property
    def local_gpus(self) -> int:
        """GPUs this machine's jobs share: the cap on concurrent ``gpu`` resources."""
        return len(self.groups) * self.gpus_per_model if self.mode == "local" else 0


def device_plan(
    config: dict, under_cluster_executor: bool = False, environ=os.environ
) -> DevicePlan:
    """The run's device plan from its config.

    ``gpu_assignment: auto`` resolves as ``resolve_gpu_assignment`` says (the Snakefile
    writes the resolved value back into the config, so jobs see what it decided). In
    local mode the group ids are checked against the shell's ``CUDA_VISIBLE_DEVICES``
    now, not when the first job tries to claim them.
    """
    assignment = resolve_gpu_assignment(
        config.get("gpu_assignment", "auto"), under_cluster_executor
    )
    if assignment not in ("local", "scheduler"):
        raise GpuConfigError(f"gpu_assignment={assignment!r}: use 'auto', 'local' or 'scheduler'")
    groups = build_groups(parse_gpus(config.get("gpus")), config.get("gpus_per_model", 1))
    if assignment == "local":
        for group in groups:
            physical_devices(group, environ.get("CUDA_VISIBLE_DEVICES"))
    mode = "scheduler" if assignment == "scheduler" else ("local" if groups else "cpu")
    return DevicePlan(
        mode,
        tuple(groups),
        int(config.get("gpus_per_model", 1)),
        bool(config.get("allow_cpu", False)),
    )


def physical_devices(group: Sequence[int], inherited_mask: str | None) -> list[str]:
    """Map group indices to what ``CUDA_VISIBLE_DEVICES`` must hold.

    Indices select from an inherited mask (as CUDA itself does); entries are passed
    through unchanged, so UUIDs and MIG ids work.
    """
    if inherited_mask is None:
        return [str(g) for g in group]
    entries = [e.strip() for e in inherited_mask.split(",") if e.strip()]
    if not entries:
        raise GpuConfigError(
            "CUDA_VISIBLE_DEVICES is set but empty in your shell, so CUDA sees no GPU; unset it "
            "(or list GPUs in it) to use gpus, or run with gpus= for CPU"
        )
    if len(set(entries)) != len(entries):
        raise GpuConfigError(
            f"CUDA_VISIBLE_DEVICES={inherited_mask} lists a GPU more than once; list each once"
        )
    too_high = [g for g in group if g >= len(entries)]
    if too_high:
        raise GpuConfigError(
            f"gpus lists {too_high} but CUDA_VISIBLE_DEVICES={inherited_mask} in your shell "
            f"exposes only {len(entries)} GPU(s) (ids 0..{len(entries) - 1}); gpus indexes "
            "into that list, so use smaller ids or unset CUDA_VISIBLE_DEVICES"
        )
    return [entries[g] for g in group]


@dataclass
class Claim:
    """The GPUs a running job holds: ``cuda_visible_devices`` is what CUDA sees."""

    cuda_visible_devices: str
    group_index: int | None
    hostname: str = field(default_factory=socket.gethostname)
    started_at: float = field(default_factory=time.time)
    _lock_fds: list[int] = field(default_factory=list, repr=False)

    @property
    def lock_fds(self) -> tuple[int, ...]:
        """The descriptors holding the group's locks: a process that inherits them holds
        the group until it exits too (tensor-parallel ranks)."""
        return tuple(self._lock_fds)

    def release(self) -> None:
        _unlock(self._lock_fds)
        self._lock_fds.clear()


def _unlock(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def lock_dir() -> Path:
    path = Path(os.environ.get(LOCK_DIR_ENV, DEFAULT_LOCK_DIR))
    path.mkdir(parents=True, exist_ok=True)
    try:
        # Machine-wide: another user's workflow must be able to take its turn too.
        os.chmod(path, 0o1777)
    except PermissionError:
        pass
    return path


def _lock_path(directory: Path, device: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", device)
    return directory / f"gpu-{safe}.lock"


def _try_lock(path: Path, holder: dict) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise lock_error(path, exc, GPU_LOCK_FIX) from exc
    try:
        taken = try_lock(fd, path, GPU_LOCK_FIX)
    except LockError:
        os.close(fd)
        raise
    if not taken:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def describe_holder(path: Path) -> str:
    try:
        return path.read_text() or "unknown holder"
    except OSError:
        return "unknown holder"


def try_claim(
    groups: Sequence[Sequence[int]],
    inherited_mask: str | None,
    holder: dict,
    directory: Path,
    first: int = 0,
) -> Claim | None:
    """Lock every GPU of the first free group (starting at ``first``), or return None
    (``LockError`` when flock fails in the lock directory in another way)."""
    for step in range(len(groups)):
        index = (first + step) % len(groups)
        devices = physical_devices(groups[index], inherited_mask)
        fds: list[int] = []
        try:
            for device in devices:
                fd = _try_lock(_lock_path(directory, device), {**holder, "gpu": device})
                if fd is None:
                    break
                fds.append(fd)
        except LockError:
            _unlock(fds)
            raise
        if len(fds) == len(devices):
            return Claim(",".join(devices), index, _lock_fds=fds)
        _unlock(fds)
    return None


def claim_group(
    groups: Sequence[Sequence[int]],
    inherited_mask: str | None,
    holder: dict,
    first: int = 0,
    poll_seconds: float = 2.0,
    report_every_s: float = 60.0,
) -> Claim:
    """Block until a whole group is free, logging who holds what while waiting."""
    directory = lock_dir()
    # Validate the mapping before waiting so a bad mask fails at once.
    for group in groups:
        physical_devices(group, inherited_mask)
    last_report = 0.0
    while True:
        claim = try_claim(groups, inherited_mask, holder, directory, first)
        if claim is not None:
            return claim
        now = time.monotonic()
        if now - last_report >= report_every_s:
            held = {
                device: describe_holder(_lock_path(directory, device))
                for group in groups
                for device in physical_devices(group, inherited_mask)
            }
            log.warning("every GPU group is busy; waiting. Holders: %s", held)
            last_report = now
        time.sleep(poll_seconds)


@contextmanager
def gpu_claim(
    plan: DevicePlan,
    holder: dict | None = None,
    first: int = 0,
    environ: dict | None = None,
    poll_seconds: float = 2.0,
) -> Iterator[Claim]:
    """Claim a group for the duration of the block and set ``CUDA_VISIBLE_DEVICES``.

    - ``scheduler``: keep what the cluster set (the scheduler picked this job's
      GPUs), no lock.
    - ``cpu``: ``CUDA_VISIBLE_DEVICES`` is set empty, no lock.
    - ``local``: lock a free group and narrow ``CUDA_VISIBLE_DEVICES`` to it.
    """
    env = os.environ if environ is None else environ
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    if plan.mode == "scheduler":
        yield Claim(inherited or "", None)
        return
    if plan.mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        yield Claim("", None)
        return
    claim = claim_group(
        plan.groups,
        inherited,
        {"pid": os.getpid(), "host": socket.gethostname(), **(holder or {})},
        first=first,
        poll_seconds=poll_seconds,
    )
    env["CUDA_VISIBLE_DEVICES"] = claim.cuda_visible_devices
    try:
        yield claim
    finally:
        claim.release()
