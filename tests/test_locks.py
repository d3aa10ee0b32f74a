"""Locks on filesystems whose flock fails, and the disk check of shards starting together.

No mount here has a broken flock, so those tests make ``fcntl.flock`` raise what NFS
and Lustre raise (ENOLCK, EOPNOTSUPP); "already held" and the disk room use real
flocks held by real processes, and the real free space of the test's disk.
"""

import errno
import fcntl
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from teacher_logits import gpus, locks
from teacher_logits.disk import free_bytes
from teacher_logits.disk_reservations import room_ledger
from teacher_logits.errors import ConfigError, DiskFullError, LockError
from teacher_logits.generation.parts import job_lock
from teacher_logits.layout import RunLayout, partial_path
from teacher_logits.prune import main as prune_main
from teacher_logits.run_lock import hold_run_lock, run_lock_held
from teacher_logits.status import collect, lock_held, render

from conftest import REPO

FORK = multiprocessing.get_context("fork")
# Upper-bound bytes per token of these plans (top_k=64, float16, entropy): the shard's
# row uncompressed plus its resume part's row.
SHARD_ROW, PART_ROW = 4 + 64 * 6 + 4 + 2, 64 * 6 + 4 + 2


def failing_flock(code, after=0):
    """``fcntl.flock`` that fails with ``code`` from its ``after+1``-th lock on; unlocks work."""
    real, calls = fcntl.flock, []

    def flock(handle, operation):
        if not operation & fcntl.LOCK_UN:
            calls.append(operation)
            if len(calls) > after:
                raise OSError(code, os.strerror(code))
        return real(handle, operation)

    return flock


def assert_one_line(error, path, *words):
    message = str(error)
    assert "\n" not in message
    assert f"cannot take the lock {path}: flock failed there with" in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_failing_flock_names_the_lock_and_the_fix(tmp_path, monkeypatch, code):
    monkeypatch.setattr(locks.fcntl, "flock", failing_flock(code))
    reason = (os.strerror(code), errno.errorcode[code])

    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path / "gpu"))
    plan = gpus.DevicePlan("local", ((0,),), 1)
    with pytest.raises(LockError) as error:
        with gpus.gpu_claim(plan, environ={}):
            pass
    fix = (gpus.LOCK_DIR_ENV, "local disk", "gpu_assignment: scheduler")
    assert_one_line(error.value, tmp_path / "gpu" / "gpu-0.lock", *reason, *fix)

    out = tmp_path / "out"
    with pytest.raises(ConfigError) as error:  # what the Snakefile's run-lock call catches
        hold_run_lock(out)
    assert isinstance(error.value, LockError)
    assert_one_line(error.value, RunLayout(out).run_lock, *reason, "put output_dir on a")

    shard = RunLayout(out).shard(3)
    with pytest.raises(LockError) as error:
        with job_lock(shard, poll_s=0.01):
            pass
    assert_one_line(error.value, RunLayout(out).shard_lock(3), *reason, "NFS v4 / Lustre")


def test_a_group_whose_second_lock_fails_leaves_the_first_free(tmp_path, monkeypatch):
    monkeypatch.setattr(locks.fcntl, "flock", failing_flock(errno.ENOLCK, after=1))
    with pytest.raises(LockError, match="gpu-1.lock"):
        gpus.try_claim([(0, 1)], None, {}, tmp_path)
    monkeypatch.undo()
    # Another descriptor of this process conflicts with a leaked one: flock is per open file.
    claim = gpus.try_claim([(0, 1)], None, {}, tmp_path)
    assert claim is not None and claim.cuda_visible_devices == "0,1"
    claim.release()


def test_status_notes_once_and_counts_the_shard_as_not_running(tmp_path, monkeypatch, capsys):
    for name in ("shard_00000.lock", "shard_00001.lock"):
        (tmp_path / name).touch()
    monkeypatch.setattr(locks.fcntl, "flock", failing_flock(errno.ENOLCK))
    assert not lock_held(tmp_path / "shard_00000.lock")
    assert not lock_held(tmp_path / "shard_00001.lock")
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: status cannot see which shards")
    assert "No locks available" in notes[0] and "output_dir" in notes[0]


def _hold(path, ready, release):
    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("pid 12345 on elsewhere\n")
    handle.flush()
    ready.set()
    release.wait(60)


@pytest.fixture
def holder():
    """Hold an exclusive flock on a path from another process until released."""
    started = []

    def start(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        ready, release = FORK.Event(), FORK.Event()
        process = FORK.Process(target=_hold, args=(path, ready, release))
        process.start()
        assert ready.wait(30)
        started.append((process, release))
        return release

    yield start
    for process, release in started:
        release.set()
        process.join(30)


def test_a_lock_held_by_another_process_behaves_as_before(tmp_path, holder, caplog):
    out = RunLayout(tmp_path / "out")
    holder(out.run_lock)
    with pytest.raises(ConfigError, match=r"another Snakemake run \(pid 12345 on elsewhere;") as e:
        hold_run_lock(out.output_dir)
    assert "`kill 12345` on elsewhere (`kill -9 12345` if it ignores SIGTERM)" in str(e.value)

    holder(tmp_path / "gpu" / "gpu-0.lock")
    assert gpus.try_claim([(0,)], None, {}, tmp_path / "gpu") is None

    release = holder(out.shard_lock(0))
    assert lock_held(out.shard_lock(0))
    timer = threading.Timer(0.3, release.set)
    timer.start()
    with caplog.at_level(logging.WARNING), job_lock(out.shard(0), poll_s=0.02) as path:
        assert path == out.shard_lock(0)  # taken once the holder let go
    timer.join()
    assert "shard_00000.lock is held by pid 12345 on elsewhere; waiting" in caplog.text
    assert not lock_held(out.shard_lock(0))


# --- the disk room of shards starting together ---------------------------------------


def half_disk_plan(layout, shards=3):
    """Shards each needing about 60% of the free space: one fits, two do not. This holds
    unless, within the second the test takes, the disk's free space (shared with other
    processes) shrinks by 40% or grows by 20%."""
    tokens = int(0.6 * free_bytes(layout.output_dir) / (SHARD_ROW + PART_ROW))
    return {
        "num_shards": shards,
        "top_k": 64,
        "settings": {"storage": {"value_dtype": "float16"}, "generation": {"store_entropy": True}},
        "shards": [{"index": i, "num_tokens": tokens, "num_samples": 10} for i in range(shards)],
    }


def check(layout, plan, shard):
    from teacher_logits.disk import check_shard_fits

    check_shard_fits(layout, plan, shard, "float16", True)


def _start_shard(layout, plan, shard, go, results, finish):
    """A generate job's start: its job lock, then the disk check; it keeps the lock (and so
    its reservation) until told to finish."""
    with job_lock(layout.shard(shard)):
        go.wait(30)
        try:
            check(layout, plan, shard)
            results.put((shard, "fits"))
        except DiskFullError as error:
            results.put((shard, str(error)))
        finish.wait(60)


def test_two_shards_starting_together_on_room_for_one(tmp_path):
    layout = RunLayout(tmp_path)
    plan = half_disk_plan(layout)
    check(layout, plan, 2)  # each fits alone (no lock held: this reservation is stale)
    go, finish, results = FORK.Event(), FORK.Event(), FORK.Queue()
    jobs = [
        FORK.Process(target=_start_shard, args=(layout, plan, s, go, results, finish))
        for s in (0, 1)
    ]
    for job in jobs:
        job.start()
    go.set()
    outcome = dict(results.get(timeout=60) for _ in jobs)
    finish.set()
    for job in jobs:
        job.join(30)
        assert job.exitcode == 0
    passed = [s for s, text in outcome.items() if text == "fits"]
    assert len(passed) == 1, outcome
    refused = outcome[1 - passed[0]]
    assert refused.startswith(f"disk full: shard {1 - passed[0]} needs about")
    assert f"of which running jobs (shards {passed[0]}) still need" in refused
    assert refused.endswith("free some space or point output_dir at a bigger disk, then rerun")


def _reserve_and_wait(layout, plan, shard, ready):
    with job_lock(layout.shard(shard)):
        check(layout, plan, shard)
        ready.set()
        threading.Event().wait(120)


def test_a_killed_jobs_reservation_no_longer_counts(tmp_path):
    layout = RunLayout(tmp_path)
    plan = half_disk_plan(layout)
    ready = FORK.Event()
    job = FORK.Process(target=_reserve_and_wait, args=(layout, plan, 0, ready))
    job.start()
    assert ready.wait(30)
    with job_lock(layout.shard(1)):
        with pytest.raises(DiskFullError, match=r"running jobs \(shards 0\) still need"):
            check(layout, plan, 1)
        os.kill(job.pid, signal.SIGKILL)
        job.join(30)
        check(layout, plan, 1)  # the kernel dropped the killed job's lock: its room is free
    assert layout.disk_ledger.read_text().count('"bytes"') == 1


def test_a_reservation_shrinks_by_what_its_job_has_written(tmp_path):
    layout = RunLayout(tmp_path)
    plan = half_disk_plan(layout)
    plan["shards"][0]["num_tokens"] = 1000  # about 1.5 MB, upper bound
    ready = FORK.Event()
    job = FORK.Process(target=_reserve_and_wait, args=(layout, plan, 0, ready))
    job.start()
    try:
        assert ready.wait(30)
        with room_ledger(layout) as ledger:
            reserved = ledger.reserved_by_others(1)[0]
        assert reserved > 1_000_000
        layout.parts_dir(0).mkdir()
        (layout.parts_dir(0) / "part_0000000000.h5").write_bytes(b"\0" * 300_000)
        partial_path(layout.shard(0)).write_bytes(b"\0" * 200_000)
        os.link(partial_path(layout.shard(0)), layout.parts_dir(0) / "assembled.h5")
        with room_ledger(layout) as ledger:  # the hard link is the same bytes: counted once
            assert ledger.reserved_by_others(1) == {0: reserved - 500_000}
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.join(30)
    with room_ledger(layout) as ledger:
        assert ledger.reserved_by_others(1) == {}


# --- a run lock whose holder lives on after its run ------------------------------------

HOLD_RUN_LOCK = """
import sys, time
from teacher_logits.generation.parts import job_lock
from teacher_logits.layout import RunLayout
from teacher_logits.run_lock import hold_run_lock
hold_run_lock(sys.argv[1])
if len(sys.argv) > 2:  # a generate job of the run, working on that shard
    job = job_lock(RunLayout(sys.argv[1]).shard(int(sys.argv[2])))
    job.__enter__()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def run_lock_holder(tmp_path):
    """A real process that takes the run lock through the library, then sleeps."""
    started = []

    def start(out, *shard):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_RUN_LOCK, str(out), *map(str, shard)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(30)


def test_a_held_run_lock_names_its_holder_and_the_command_that_frees_it(
    tmp_path, run_lock_holder, capsys
):
    out = tmp_path / "out"
    holder = run_lock_holder(out)
    time.sleep(1.1)
    with pytest.raises(ConfigError) as refused:
        hold_run_lock(out)
    message = str(refused.value)
    assert "\n" not in message
    assert f"another Snakemake run (pid {holder.pid} on {socket.gethostname()}" in message
    assert re.search(r"holding the lock for [1-9]\d*s", message), message
    assert "no job of the run is running: no shard lock is held" in message
    assert f"`kill {holder.pid}` (`kill -9 {holder.pid}` if it ignores SIGTERM)" in message

    text = render(collect(out))
    assert f"run lock: held by pid {holder.pid} on {socket.gethostname()} for " in text
    assert f"free the lock with `kill {holder.pid}`" in text
    # prune changes the run's files: it refuses while the lock is held.
    assert prune_main([str(out)]) == 1
    assert f"`kill {holder.pid}`" in capsys.readouterr().out

    holder.kill()
    holder.wait(30)
    assert collect(out)["run_lock"] is None
    with run_lock_held(out):  # free again, with no --unlock
        pass


def test_a_held_run_lock_says_which_jobs_of_the_run_are_working(tmp_path, run_lock_holder):
    out = tmp_path / "out"
    holder = run_lock_holder(out, 1)
    info = collect(out)["run_lock"]
    assert info["pid"] == holder.pid and info["doing"] == "generate jobs are running on shards 1"


def test_a_damaged_disk_ledger_is_ignored_with_one_warning(tmp_path, caplog):
    layout = RunLayout(tmp_path / "out")
    layout.shards_dir.mkdir(parents=True)
    plan = {
        **half_disk_plan(layout, shards=1),
        "shards": [{"index": 0, "num_tokens": 10, "num_samples": 1}],
    }
    for damage in ("[1, 2]", '{"3": "x"}', "{"):
        layout.disk_ledger.write_text(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check(layout, plan, 0)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert str(layout.disk_ledger) in warning
        assert list(json.loads(layout.disk_ledger.read_text())) == ["0"]  # written anew
