"""Unit tests for teacher_logits.gpus: parsing, grouping, masks and flock claims.

The lock tests use real processes (subprocess running ``python -c``) and real
``fcntl.flock`` locks in a per-test lock directory; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import teacher_logits.gpus as devices  # noqa: E402
from teacher_logits.errors import GpuConfigError  # noqa: E402

HOLDER = {"test": "pytest"}


def claim_for(gpus, per_model, assignment="local", **kwargs):
    """``gpu_claim`` on the device plan of a config with these GPU keys."""
    config = {"gpus": gpus, "gpus_per_model": per_model, "gpu_assignment": assignment}
    return devices.gpu_claim(devices.device_plan(config, environ={}), **kwargs)


# --------------------------------------------------------------------------------------
# parse_gpus
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0,1,2,3", [0, 1, 2, 3]),  # --config gpus=0,1,2,3
        (0, [0]),  # --config gpus=0 arrives as an int
        (3, [3]),
        (["0", "1"], [0, 1]),  # --config gpus=[0,1]
        (["[0", "1]"], [0, 1]),  # the same, quoted differently
        ("[0,1]", [0, 1]),
        ([0, 1], [0, 1]),  # YAML list
        ((2, 3), [2, 3]),
        ("", []),  # CPU mode
        ("   ", []),
        (None, []),
        ([], []),
        ("1,3,5,7", [1, 3, 5, 7]),  # non-consecutive
        (" 0, 1 ", [0, 1]),  # whitespace
        ("0 1", [0, 1]),
        ("7", [7]),
    ],
)
def test_parse_gpus_accepts_every_config_form(value, expected):
    assert devices.parse_gpus(value) == expected


def test_parse_gpus_returns_plain_ints():
    ids = devices.parse_gpus(["0", " 2 "])
    assert ids == [0, 2]
    assert all(type(i) is int for i in ids)


@pytest.mark.parametrize(
    "value, fix",
    [
        ("0,0", "list each GPU once"),
        ([1, 2, 1], "list each GPU once"),
        ("0,a", "gpus="),
        ("1.5", "gpus="),
        ([1.5], "gpus="),
        ("-1", "gpus="),
        (-1, "gpus="),
        ([-2], "gpus="),
        (True, "gpus="),
        (False, "gpus="),
        ([True], "gpus="),
        ({"a": 0}, "gpus="),
        (1.0, "gpus="),
    ],
)
def test_parse_gpus_rejects_bad_values_with_a_fix(value, fix):
    with pytest.raises(GpuConfigError) as info:
        devices.parse_gpus(value)
    assert fix in str(info.value)
    # a user-facing error: a ValueError subclass so generic handlers catch it
    assert isinstance(info.value, ValueError)


def test_parse_gpus_duplicate_message_names_the_duplicate():
    with pytest.raises(GpuConfigError, match=r"\[0\]"):
        devices.parse_gpus("0,0,1")


def test_parse_gpus_negative_message_says_ids_start_at_zero():
    with pytest.raises(GpuConfigError, match="start at 0"):
        devices.parse_gpus(-1)


# --------------------------------------------------------------------------------------
# build_groups
# --------------------------------------------------------------------------------------


def test_build_groups_pairs():
    assert devices.build_groups([0, 1, 2, 3], 2) == [(0, 1), (2, 3)]


def test_build_groups_one_per_model():
    assert devices.build_groups([0, 1, 2, 3], 1) == [(0,), (1,), (2,), (3,)]


def test_build_groups_all_in_one():
    assert devices.build_groups([0, 1, 2, 3], 4) == [(0, 1, 2, 3)]


def test_build_groups_non_consecutive_ids_keep_order():
    assert devices.build_groups([1, 3, 5, 7], 2) == [(1, 3), (5, 7)]


def test_build_groups_empty_is_cpu_mode():
    assert devices.build_groups([], 2) == []


def test_build_groups_uneven_names_gpus_per_model():
    with pytest.raises(GpuConfigError) as info:
        devices.build_groups([0, 1, 2], 2)
    message = str(info.value)
    assert "gpus_per_model" in message
    assert "gpus=0,1" in message  # suggests a usable list


def test_build_groups_fewer_gpus_than_per_model():
    with pytest.raises(GpuConfigError, match="gpus_per_model"):
        devices.build_groups([0], 2)


@pytest.mark.parametrize("per_model", [0, -1, "0"])
def test_build_groups_rejects_per_model_below_one(per_model):
    with pytest.raises(GpuConfigError, match="at least 1"):
        devices.build_groups([0, 1], per_model)


@pytest.mark.parametrize("per_model", ["two", 1.5, True, None, "-2"])
def test_build_groups_rejects_non_integer_per_model(per_model):
    with pytest.raises(GpuConfigError, match="gpus_per_model="):
        devices.build_groups([0, 1], per_model)


def test_build_groups_accepts_string_per_model():
    # --config gpus_per_model=2 may arrive as the string "2"
    assert devices.build_groups([0, 1, 2, 3], "2") == [(0, 1), (2, 3)]


def test_device_plan_end_to_end():
    plan = devices.device_plan({"gpus": "0,1,2,3", "gpus_per_model": "2"}, environ={})
    assert plan.groups == ((0, 1), (2, 3)) and plan.mode == "local"
    assert plan.gpus_per_job == 2 and plan.local_gpus == 4 and plan.wants_gpu
    for empty in ("", None, []):
        cpu = devices.device_plan({"gpus": empty, "gpus_per_model": 2}, environ={})
        assert (
            cpu.mode == "cpu" and cpu.groups == () and cpu.gpus_per_job == 0 and not cpu.wants_gpu
        )
    scheduler = devices.device_plan(
        {"gpus": "", "gpus_per_model": 2, "gpu_assignment": "scheduler"}, environ={}
    )
    assert scheduler.mode == "scheduler" and scheduler.gpus_per_job == 2
    assert scheduler.local_gpus == 0  # a scheduler's jobs are not capped locally


def test_device_plan_checks_ids_against_the_shell_mask():
    with pytest.raises(GpuConfigError, match="exposes only 2 GPU"):
        devices.device_plan(
            {"gpus": "0,1,2,3", "gpus_per_model": 2}, environ={"CUDA_VISIBLE_DEVICES": "4,5"}
        )


# --------------------------------------------------------------------------------------
# physical_devices
# --------------------------------------------------------------------------------------


def test_physical_devices_without_mask():
    assert devices.physical_devices((0, 1), None) == ["0", "1"]
    assert devices.physical_devices((5, 7), None) == ["5", "7"]


@pytest.mark.parametrize("mask", ["", "  "])
def test_empty_inherited_mask_means_no_gpu_visible(mask):
    # CUDA itself shows no GPU under an empty mask: say so instead of ignoring it.
    with pytest.raises(GpuConfigError, match="CUDA_VISIBLE_DEVICES is set but empty"):
        devices.physical_devices((0, 1), mask)


def test_repeated_mask_entry_is_an_error_not_a_deadlock():
    with pytest.raises(GpuConfigError, match="more than once"):
        devices.physical_devices((0, 1), "4,4")


def test_physical_devices_indexes_into_inherited_mask():
    assert devices.physical_devices((0, 1), "4,5,6,7") == ["4", "5"]
    assert devices.physical_devices((2, 3), "4,5,6,7") == ["6", "7"]
    assert devices.physical_devices((1,), " 4 , 5 ") == ["5"]


def test_physical_devices_passes_uuid_and_mig_through():
    mask = "GPU-aaa,MIG-bbb"
    assert devices.physical_devices((0, 1), mask) == ["GPU-aaa", "MIG-bbb"]
    assert devices.physical_devices((1,), mask) == ["MIG-bbb"]


def test_physical_devices_index_beyond_mask():
    with pytest.raises(GpuConfigError) as info:
        devices.physical_devices((2, 3), "4,5")
    message = str(info.value)
    assert "CUDA_VISIBLE_DEVICES" in message
    assert "[2, 3]" in message


# --------------------------------------------------------------------------------------
# gpu_claim / try_claim in one process
# --------------------------------------------------------------------------------------


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    path = tmp_path / "locks"
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(path))
    return path


def test_lock_dir_follows_env(lock_dir):
    assert devices.lock_dir() == lock_dir
    assert lock_dir.is_dir()


@pytest.mark.parametrize("gpus", ["", None, []])
def test_gpu_claim_cpu_mode_hides_gpus(lock_dir, gpus):
    environ = {}
    with claim_for(gpus, 2, environ=environ) as claim:
        assert environ["CUDA_VISIBLE_DEVICES"] == ""
        assert claim.cuda_visible_devices == ""
        assert claim.group_index is None
    # CPU mode also overrides an inherited mask
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    with claim_for(gpus, 1, environ=environ):
        assert environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not lock_dir.exists() or not list(lock_dir.glob("*.lock"))


def test_gpu_claim_scheduler_mode_keeps_mask_and_takes_no_lock(lock_dir):
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    with claim_for("0,1", 2, assignment="scheduler", environ=environ) as claim:
        assert environ == {"CUDA_VISIBLE_DEVICES": "0,1"}
        assert claim.cuda_visible_devices == "0,1"
        assert claim.group_index is None
        # the same GPUs are still free for a local claim at the same time
        other_env = {}
        with claim_for("0,1", 2, environ=other_env, poll_seconds=0.01) as local:
            assert other_env["CUDA_VISIBLE_DEVICES"] == "0,1"
            assert local.group_index == 0


def test_gpu_claim_scheduler_mode_without_mask(lock_dir):
    environ = {}
    with claim_for("0,1", 2, assignment="scheduler", environ=environ) as claim:
        assert claim.cuda_visible_devices == ""
        assert "CUDA_VISIBLE_DEVICES" not in environ


def test_gpu_claim_rejects_unknown_assignment(lock_dir):
    with pytest.raises(GpuConfigError, match="local"):
        with claim_for("0,1", 2, assignment="slurm", environ={}):
            pass


def test_gpu_claim_local_mode_sets_group(lock_dir):
    environ = {}
    with claim_for("0,1,2,3", 2, environ=environ, poll_seconds=0.01) as first:
        assert environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert first.cuda_visible_devices == "0,1"
        assert first.group_index == 0
        environ2 = {}
        with claim_for("0,1,2,3", 2, environ=environ2, poll_seconds=0.01) as second:
            assert environ2["CUDA_VISIBLE_DEVICES"] == "2,3"
            assert second.group_index == 1
    # both released: a new claim starting at group 1 gets group 1
    environ3 = {}
    with claim_for("0,1,2,3", 2, first=1, environ=environ3, poll_seconds=0.01):
        assert environ3["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_gpu_claim_first_wraps_around(lock_dir):
    environ = {}
    with claim_for("0,1,2,3", 1, first=6, environ=environ, poll_seconds=0.01) as c:
        assert c.group_index == 2
        assert environ["CUDA_VISIBLE_DEVICES"] == "2"


def test_gpu_claim_inherited_mask(lock_dir):
    environ = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    with claim_for("0,1,2,3", 2, environ=environ, poll_seconds=0.01) as claim:
        assert environ["CUDA_VISIBLE_DEVICES"] == "4,5"
        assert claim.cuda_visible_devices == "4,5"
        # locks are named after the physical ids, not the indices
        names = sorted(p.name for p in lock_dir.glob("*.lock"))
        assert names == ["gpu-4.lock", "gpu-5.lock"]
        holder = json.loads((lock_dir / "gpu-4.lock").read_text())
        assert holder["pid"] == os.getpid()
        assert holder["gpu"] == "4"


def test_gpu_claim_uuid_mask_lock_files(lock_dir):
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-aaa,MIG-GPU-bbb/1/0"}
    with claim_for("1", 1, environ=environ, poll_seconds=0.01) as claim:
        assert environ["CUDA_VISIBLE_DEVICES"] == "MIG-GPU-bbb/1/0"
        assert claim.cuda_visible_devices == "MIG-GPU-bbb/1/0"
        locks = list(lock_dir.glob("*.lock"))
        assert len(locks) == 1 and "/" not in locks[0].name


def test_gpu_claim_bad_mask_fails_at_once(lock_dir):
    start = time.monotonic()
    with pytest.raises(GpuConfigError, match="CUDA_VISIBLE_DEVICES"):
        with claim_for("0,1,2,3", 2, environ={"CUDA_VISIBLE_DEVICES": "4,5"}, poll_seconds=5):
            pass
    assert time.monotonic() - start < 2


def test_gpu_claim_releases_on_exception(lock_dir):
    with pytest.raises(RuntimeError):
        with claim_for("0,1", 2, environ={}, poll_seconds=0.01):
            raise RuntimeError("job failed")
    claim = devices.try_claim([(0, 1)], None, HOLDER, devices.lock_dir())
    assert claim is not None
    claim.release()


def test_try_claim_in_process_exclusive_and_release(lock_dir):
    directory = devices.lock_dir()
    a = devices.try_claim([(0, 1)], None, HOLDER, directory)
    assert a is not None and a.cuda_visible_devices == "0,1"
    assert devices.try_claim([(0, 1)], None, HOLDER, directory) is None
    # a group that overlaps in one GPU is also blocked, and the partial lock is undone
    assert devices.try_claim([(1, 2)], None, HOLDER, directory) is None
    c = devices.try_claim([(2, 3)], None, HOLDER, directory)
    assert c is not None and c.cuda_visible_devices == "2,3"
    a.release()
    a.release()  # idempotent
    b = devices.try_claim([(0, 1)], None, HOLDER, directory)
    assert b is not None
    b.release()
    c.release()


def test_locks_keyed_on_physical_id_in_process(lock_dir):
    directory = devices.lock_dir()
    a = devices.try_claim([(0,)], "4,5", HOLDER, directory)
    assert a is not None and a.cuda_visible_devices == "4"
    # different mask, different index, same physical GPU 4
    assert devices.try_claim([(1,)], "5,4", HOLDER, directory) is None
    b = devices.try_claim([(0,)], "5,4", HOLDER, directory)
    assert b is not None and b.cuda_visible_devices == "5"
    a.release()
    b.release()


# --------------------------------------------------------------------------------------
# across processes
# --------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    args = json.loads(sys.argv[1])
    sys.path.insert(0, args["root"])
    import teacher_logits.gpus as devices
    go = args.get("go")
    if go:
        while not Path(go).exists():
            time.sleep(0.005)
    environ = dict(args.get("environ", {}))
    with devices.gpu_claim(
        devices.device_plan({"gpus": args["gpus"], "gpus_per_model": args["per_model"]}, environ={}),
        environ=environ,
        first=args.get("first", 0), poll_seconds=0.01,
    ) as claim:
        start = time.time()
        tmp = Path(args["ready"] + ".tmp")
        tmp.write_text(environ["CUDA_VISIBLE_DEVICES"])
        tmp.rename(args["ready"])
        time.sleep(args["hold"])
        end = time.time()
    if args.get("record"):
        Path(args["record"]).write_text(json.dumps(
            {"devices": claim.cuda_visible_devices, "start": start, "end": end}
        ))
    """
)


def spawn_holder(lock_dir: Path, ready: Path, gpus, per_model, hold, **extra):
    env = dict(os.environ)
    env[devices.LOCK_DIR_ENV] = str(lock_dir)
    args = {
        "root": str(ROOT),
        "gpus": gpus,
        "per_model": per_model,
        "ready": str(ready),
        "hold": hold,
        **extra,
    }
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env)


def wait_ready(ready: Path, proc: subprocess.Popen, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"holder exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("holder never signalled that it holds its claim")
        time.sleep(0.01)
    return ready.read_text()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.mark.timeout(60)
def test_lock_exclusive_across_processes(lock_dir, tmp_path):
    ready = tmp_path / "ready"
    proc = spawn_holder(lock_dir, ready, "0,1", 2, hold=30)
    try:
        assert wait_ready(ready, proc) == "0,1"
        directory = devices.lock_dir()
        # the single group is held by the child
        assert devices.try_claim([(0, 1)], None, HOLDER, directory) is None
        assert devices.try_claim([(0,)], None, HOLDER, directory) is None
        assert devices.try_claim([(1,)], None, HOLDER, directory) is None
        # with two groups the parent gets the other one, whatever group it tries first
        for first in (0, 1):
            claim = devices.try_claim(
                devices.build_groups([0, 1, 2, 3], 2), None, HOLDER, directory, first=first
            )
            assert claim is not None
            assert claim.cuda_visible_devices == "2,3"
            assert claim.group_index == 1
            claim.release()
        # the holder is recorded in the lock file for the waiting message
        holder = json.loads(devices.describe_holder(devices._lock_path(directory, "0")))
        assert holder["pid"] == proc.pid
    finally:
        stop(proc)


@pytest.mark.timeout(60)
def test_lock_released_when_holder_is_sigkilled(lock_dir, tmp_path):
    ready = tmp_path / "ready"
    proc = spawn_holder(lock_dir, ready, "0,1", 2, hold=60)
    try:
        wait_ready(ready, proc)
        directory = devices.lock_dir()
        assert devices.try_claim([(0, 1)], None, HOLDER, directory) is None
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        claim = devices.try_claim([(0, 1)], None, HOLDER, directory)
        assert claim is not None, "a SIGKILLed holder left its GPUs locked"
        assert claim.cuda_visible_devices == "0,1"
        claim.release()
    finally:
        stop(proc)


@pytest.mark.timeout(60)
def test_claim_group_waits_until_holder_exits(lock_dir, tmp_path):
    ready = tmp_path / "ready"
    hold = 1.0
    proc = spawn_holder(lock_dir, ready, "0,1", 2, hold=hold)
    try:
        wait_ready(ready, proc)
        t0 = time.monotonic()
        directory = devices.lock_dir()
        assert devices.try_claim([(0, 1)], None, HOLDER, directory) is None
        claim = devices.claim_group([(0, 1)], None, HOLDER, poll_seconds=0.02, report_every_s=0.2)
        waited = time.monotonic() - t0
        assert claim.cuda_visible_devices == "0,1"
        assert waited >= 0.5 * hold, f"claimed after {waited:.2f}s while the holder still held"
        assert waited < 15
        claim.release()
        assert proc.wait(timeout=10) == 0
    finally:
        stop(proc)


@pytest.mark.timeout(60)
def test_locks_keyed_on_physical_id_across_processes(lock_dir, tmp_path):
    ready = tmp_path / "ready"
    # child: mask "4,5", gpus=0 -> physical GPU 4
    proc = spawn_holder(lock_dir, ready, "0", 1, hold=30, environ={"CUDA_VISIBLE_DEVICES": "4,5"})
    try:
        assert wait_ready(ready, proc) == "4"
        directory = devices.lock_dir()
        # parent: mask "5,4", group (1,) -> physical GPU 4 again: busy
        assert devices.try_claim([(1,)], "5,4", HOLDER, directory) is None
        # group (0,) under "5,4" is physical GPU 5: free
        claim = devices.try_claim([(0,)], "5,4", HOLDER, directory)
        assert claim is not None and claim.cuda_visible_devices == "5"
        claim.release()
    finally:
        stop(proc)


@pytest.mark.timeout(90)
def test_many_processes_never_share_a_group(lock_dir, tmp_path):
    go = tmp_path / "go"
    procs, records = [], []
    try:
        for i in range(8):
            record = tmp_path / f"record-{i}.json"
            records.append(record)
            procs.append(
                spawn_holder(
                    lock_dir,
                    tmp_path / f"ready-{i}",
                    "0,1,2,3",
                    2,
                    hold=0.2,
                    go=str(go),
                    record=str(record),
                    first=i,
                )
            )
        time.sleep(0.3)  # let the interpreters start, then release them together
        go.write_text("go")
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            stop(proc)

    rows = [json.loads(r.read_text()) for r in records]
    assert len(rows) == 8
    by_devices: dict[str, list[dict]] = {}
    for row in rows:
        assert row["devices"] in ("0,1", "2,3")
        assert row["end"] > row["start"]
        by_devices.setdefault(row["devices"], []).append(row)
    assert set(by_devices) == {"0,1", "2,3"}, f"only {set(by_devices)} used"
    for group, group_rows in by_devices.items():
        group_rows.sort(key=lambda r: r["start"])
        for before, after in zip(group_rows, group_rows[1:]):
            assert after["start"] >= before["end"], f"two holders of {group} overlapped"


def test_gpu_groups_imports_neither_snakemake_nor_torch():
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import teacher_logits.gpus; "
        "assert 'torch' not in sys.modules and 'snakemake' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'snakemake'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
