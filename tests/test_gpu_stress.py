"""GPU groups under stress: 56 short shards on 4 groups of 2, jobs SIGKILLed mid-claim.

CPU emulation (allow_cpu=true) runs the real claim path: fcntl locks per GPU id,
CUDA_VISIBLE_DEVICES per group. Checked afterwards from the shards' own `claims`
provenance: no GPU id was ever claimed by two jobs at once, every group worked,
and the kills left no lock behind that blocks the rerun.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import time
from collections import defaultdict

import h5py
import pytest
import yaml

from teacher_logits.store.format import read_attrs

from conftest import snakemake_bin

NUM_SHARDS = 56
STRESS = {
    "gpus": "0,1,2,3,4,5,6,7",
    "gpus_per_model": 2,
    "allow_cpu": True,
    "num_shards": NUM_SHARDS,
    "dataset": {"max_samples": 2 * NUM_SHARDS},
    "tokenize": {"max_length": 16},
    "generation": {"threads": 1, "batch_tokens": 256, "top_k": 4},
}
GROUPS = {"0,1", "2,3", "4,5", "6,7"}


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # exited since its parent listed it
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
        except OSError:
            pass
    return found


def _descendants(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _claim_holders(lock_dir) -> set[int]:
    """Pids that wrote themselves into a GPU lock file (they hold or just held a claim)."""
    pids = set()
    for path in lock_dir.glob("gpu-*.lock"):
        try:
            pids.add(int(json.loads(path.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            pass
    return pids


def _done(wf) -> int:
    return len(list(wf.path("results/demo/shards").glob("shard_*.h5")))


def _run_and_kill(wf, command, env, rng, kill_when_done: int | None, kills: int) -> list[int]:
    """Run the command; once `kill_when_done` shards exist, SIGKILL `kills` claim holders."""
    process = subprocess.Popen(
        command,
        cwd=wf.root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    killed: list[int] = []
    try:
        while process.poll() is None:
            if kill_when_done is not None and len(killed) < kills and _done(wf) >= kill_when_done:
                ours = _descendants(process.pid)
                holders = sorted(_claim_holders(wf.lock_dir) & ours - set(killed))
                if holders:
                    victim = rng.choice(holders)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        killed.append(victim)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    return killed


@pytest.mark.slow
def test_many_jobs_with_kills_never_share_a_gpu(workflow):
    config_path = workflow.path("stress.yaml")
    config_path.write_text(yaml.safe_dump(STRESS))
    command = [snakemake_bin(), "--cores", "8", "--configfile", str(config_path)]
    env = {**os.environ, "TEACHER_LOGITS_GPU_LOCK_DIR": str(workflow.lock_dir)}
    rng = random.Random(20240611)

    killed = []
    # Kill while jobs hold claims, at a few points of the run; each rerun is the same command.
    for kill_when_done in (4, 20, 40):
        killed += _run_and_kill(workflow, command, env, rng, kill_when_done, kills=2)
    final = subprocess.run(
        command, cwd=workflow.root, env=env, capture_output=True, text=True, timeout=1800
    )
    assert final.returncode == 0, final.stderr[-4000:]
    assert len(killed) >= 3, f"only {len(killed)} jobs were killed: the test proved little"

    intervals = defaultdict(list)  # physical GPU id -> [(start, end, shard)]
    groups_used = set()
    shards = sorted(workflow.path("results/demo/shards").glob("shard_*.h5"))
    assert len(shards) == NUM_SHARDS
    for path in shards:
        with h5py.File(path, "r") as handle:
            attrs = read_attrs(handle)
        assert attrs["cuda_visible_devices"] in GROUPS
        for claim in attrs["claims"]:
            groups_used.add(claim["cuda_visible_devices"])
            assert claim["started_at"] <= claim["finished_at"]
            for gpu in claim["cuda_visible_devices"].split(","):
                intervals[gpu].append((claim["started_at"], claim["finished_at"], path.name))
    assert groups_used == GROUPS
    for gpu, spans in intervals.items():
        spans.sort()
        for (_start_a, end_a, shard_a), (start_b, _end_b, shard_b) in zip(spans, spans[1:]):
            assert start_b >= end_a, f"GPU {gpu} claimed by {shard_a} and {shard_b} at once"

    # No lock left behind: every GPU lock is free now, and Snakemake's own lock is gone.
    for path in workflow.lock_dir.glob("gpu-*.lock"):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not list(workflow.path(".snakemake", "locks").glob("*"))
    again = subprocess.run(
        command, cwd=workflow.root, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    manifest = workflow.manifest()
    assert len(manifest["shards"]) == NUM_SHARDS
