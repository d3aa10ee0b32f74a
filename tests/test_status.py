"""The status command at every stage of a real run, and the disk-fit checks."""

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teacher_logits.disk import (
    FILE_OVERHEAD_BYTES,
    bytes_per_token,
    check_shard_fits,
    uncompressed_bytes_per_token,
)
from teacher_logits.errors import UserError
from teacher_logits.layout import RunLayout, job_record_for
from teacher_logits.prune import main as prune_main
from teacher_logits.run_stats import busy_seconds
from teacher_logits.status import collect, job_error, lock_held, render
from teacher_logits.status import main as status_main
from teacher_logits.verify import main as verify_main

from conftest import REPO

RUN = {
    "num_shards": 3,
    "dataset": {"max_samples": 60},
    "generation": {"threads": 1, "batch_tokens": 2048},
}
OUT = "results/demo"


def status(wf, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "teacher_logits.status", OUT, *args],
        cwd=wf.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def status_json(wf) -> dict:
    return json.loads(status(wf, "--json").stdout)


def by_index(state: dict) -> dict:
    return {s["index"]: s for s in state["shards"]}


@pytest.mark.slow
def test_status_through_a_run(workflow):
    # Nothing has run yet.
    missing = status(workflow, check=False)
    assert missing.returncode == 1 and "does not exist yet" in missing.stderr

    # prepare fails for real (a number where text belongs is only seen when reading
    # the rows): the status names its error.
    bad_data = workflow.path("numbers.jsonl")
    bad_data.write_text('{"text": 5}\n{"text": "fine"}\n')
    bad = workflow.run(
        "--cores",
        "1",
        f"{OUT}/prepared/plan.json",
        config={**RUN, "dataset": {**RUN.get("dataset", {}), "path": str(bad_data)}},
        check=False,
    )
    assert bad.returncode != 0
    text = status(workflow).stdout
    assert "prepare has not finished yet" in text
    assert "prepare failed: " in text and "text field holds int, not a string" in text

    # After prepare: counts and the disk estimate, before any shard runs.
    workflow.run("--cores", "1", f"{OUT}/prepared/plan.json", config=RUN)
    plan = json.loads(workflow.path(OUT, "prepared/plan.json").read_text())
    state = status_json(workflow)
    assert state["counts"] == {"done": 0, "in progress": 0, "pending": 3, "failed": 0}
    assert state["planned_tokens"] == plan["num_tokens"] and state["done_tokens"] == 0
    raw = uncompressed_bytes_per_token(64, "float16", True, cross_fields=True)
    disk = state["disk"]
    assert disk["basis"] == "upper bound before compression" and disk["bytes_per_token"] == raw
    assert disk["total_bytes"] > sum(s["num_tokens"] * raw for s in plan["shards"])
    upper_bound = disk["total_bytes"]
    assert disk["fits"] and disk["free_bytes"] > 0
    text = status(workflow).stdout
    assert "pending 3" in text and "upper bound before compression" in text and "free" in text

    # Shard 0 done for real; shard 2 fails for real (GPUs named, no CUDA, no allow_cpu).
    workflow.run("--cores", "1", f"{OUT}/shards/shard_00000.h5", config=RUN)
    failed = workflow.run(
        "--cores",
        "1",
        f"{OUT}/shards/shard_00002.h5",
        "--config",
        "gpus=0",
        config=RUN,
        check=False,
    )
    assert failed.returncode != 0

    # Shard 1 in progress: a job holds its lock and has committed half its rows.
    shards_dir = workflow.path(OUT, "shards")
    half = plan["shards"][1]["num_tokens"] // 2
    parts = shards_dir / "shard_00001.parts"
    parts.mkdir()
    (parts / "progress.json").write_text(
        json.dumps(
            {
                "rows_done": half,
                "rows_total": plan["shards"][1]["num_tokens"],
                "updated_at": time.time() - 5,
            }
        )
    )
    record = job_record_for(workflow.path(OUT, "logs/generate/shard_00001.log"))
    record.write_text(
        json.dumps({"job": "generate", "state": "running", "started_at": time.time() - 20})
    )
    lock = os.open(shards_dir / "shard_00001.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = status_json(workflow)
        text = status(workflow).stdout
    finally:
        os.close(lock)
    shards = by_index(state)
    assert state["counts"] == {"done": 1, "in progress": 1, "pending": 0, "failed": 1}
    assert (
        shards[0]["state"] == "done" and shards[0]["rows_done"] == plan["shards"][0]["num_tokens"]
    )
    assert shards[1]["state"] == "in progress" and shards[1]["rows_done"] == half
    assert shards[2]["state"] == "failed"
    assert "CUDA sees no GPU" in shards[2]["error"] and "allow_cpu=true" in shards[2]["error"]
    assert state["done_tokens"] == plan["shards"][0]["num_tokens"] + half
    assert state["tokens_per_second"] > 0 and state["eta_seconds"] > 0
    assert state["disk"]["basis"] == "measured on the finished shards"
    assert "in progress 1" in text and "failed 1" in text and "ETA" in text
    assert "CUDA sees no GPU" in text and "progress saved" in text
    pct = f"{100 * half / plan['shards'][1]['num_tokens']:.1f}%"
    assert re.search(r"^\s+1\s+in progress\s+[\d,]+\s+" + re.escape(pct), text, re.M), text
    print(text)  # shown with -s: what a user sees mid-run

    # The job died (lock released by the kernel): shard 1 is pending, partly done.
    shards = by_index(status_json(workflow))
    assert shards[1]["state"] == "pending" and "interrupted" in shards[1]["note"]
    assert "1 partly done" in status(workflow).stdout

    # Let the real run finish everything; the hand-made in-progress traces go first.
    for path in parts.iterdir():
        path.unlink()
    parts.rmdir()
    (shards_dir / "shard_00001.lock").unlink()
    workflow.run("--cores", "2", config=RUN)
    state = status_json(workflow)
    assert state["counts"] == {"done": 3, "in progress": 0, "pending": 0, "failed": 0}
    assert state["done_tokens"] == state["planned_tokens"] and state["gathered"]
    # The estimate before any shard existed was an upper bound of what was written.
    assert sum(p.stat().st_size for p in shards_dir.glob("shard_*.h5")) <= upper_bound
    text = status(workflow, "--all").stdout
    assert "all shards done and gathered" in text
    assert len(re.findall(r"^\s+\d+\s+done\s+[\d,]+\s+100\.0%", text, re.M)) == 3
    assert "finished shards by GPU group" in text


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


@pytest.mark.slow
def test_generate_refuses_a_shard_that_cannot_fit(workflow, tmp_path):
    workflow.run("--cores", "1", f"{OUT}/prepared/plan.json", config=RUN)
    shards_dir = workflow.path(OUT, "shards")
    # A real small filesystem under shards/ (needs root, as in CI); else skipped.
    if os.geteuid() != 0 or not _can_mount_tmpfs(shards_dir):
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    try:
        result = workflow.run(
            "--cores", "1", f"{OUT}/shards/shard_00000.h5", config=RUN, check=False
        )
        assert result.returncode != 0
        assert "disk full: shard 0 needs about" in result.stderr
        assert "free some space or point output_dir at a bigger disk" in result.stderr
        log = workflow.path(OUT, "logs/generate/shard_00000.log").read_text()
        assert "teacher loaded" not in log  # refused before claiming a GPU or loading anything
        text = status(workflow).stdout
        assert "failed 1" in text and "disk full: shard 0" in text
        assert "WARNING: not enough disk" in text
    finally:
        subprocess.run(["umount", str(shards_dir)], check=True)


# --- the pieces, on real files and locks ------------------------------------------


def test_busy_seconds_leaves_out_gaps_and_counts_overlaps_once():
    assert busy_seconds([]) == 0
    assert busy_seconds([(0, 10), (5, 15), (100, 110), (None, 3)]) == 25


def test_lock_held_sees_another_holder_and_releases_its_probe(tmp_path):
    path = tmp_path / "shard_00000.lock"
    assert not lock_held(path)  # no file: no job
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert not lock_held(path)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(path)
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert not lock_held(path)
        # The probe released its own lock: an exclusive lock is free to take again.
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(holder)


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "raise UserError('dataset.path: no rows; give a dataset with text in it')",
            "dataset.path: no rows; give a dataset with text in it",
        ),
        ("raise ValueError('something unexpected')", "ValueError: something unexpected"),
        ("log.info('all fine')", None),
    ],
)
def test_job_error_reads_the_record_run_job_writes(tmp_path, body, expected):
    log_path = tmp_path / "job.log"
    script = (
        "import logging\n"
        "from teacher_logits.errors import UserError\n"
        "from teacher_logits.job import run_job\n"
        "log = logging.getLogger('x')\n"
        f"def main():\n    log.info('working')\n    {body}\n"
        f"run_job('x', {str(log_path)!r}, main)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert job_error(log_path) == expected
    assert json.loads(job_record_for(log_path).read_text())["state"] == (
        "failed" if expected else "done"
    )


def _plan(num_tokens: int, num_samples: int = 10) -> dict:
    return {
        "top_k": 64,
        "settings": {"storage": {"value_dtype": "float16"}, "generation": {"store_entropy": True}},
        "shards": [
            {"index": 0, "num_tokens": num_tokens, "num_samples": num_samples},
            {"index": 1, "num_tokens": 1000, "num_samples": 10},
        ],
    }


def test_bytes_per_token_is_measured_once_a_shard_exists(tmp_path):
    plan = _plan(2000)
    layout = RunLayout(tmp_path)
    estimate = bytes_per_token(plan, layout)
    assert not estimate.measured and estimate.bytes_per_token == 4 + 64 * 4 + 64 * 2 + 4 + 2
    # HDF5 allocates whole chunks of 1024 rows: 2000 tokens take 2048 rows uncompressed.
    assert (
        estimate.shard_bytes(2000, 10)
        == 2048 * estimate.bytes_per_token + 160 + FILE_OVERHEAD_BYTES
    )
    layout.shards_dir.mkdir()
    layout.shard(1).write_bytes(b"\0" * 150_000)  # 1000 tokens
    estimate = bytes_per_token(plan, layout)
    assert estimate.measured and estimate.bytes_per_token == 150


def test_check_shard_fits_against_the_real_free_space(tmp_path):
    layout = RunLayout(tmp_path)
    check_shard_fits(layout, _plan(1000), 0, "float16", True)  # a few hundred KB fits anywhere
    with pytest.raises(UserError) as error:
        check_shard_fits(layout, _plan(10**16), 0, "float16", True)  # petabytes fit nowhere
    message = str(error.value)
    assert message.startswith("disk full: shard 0 needs about")
    assert "upper bound before compression" in message and "bytes) are free under" in message
    assert "\n" not in message


# --- a store status reads but never writes: copied, read-only, orphaned ---------------

STORE_V2 = Path(__file__).parent / "data" / "store_v2"
# What a user copies to hand a store over: no prepared/, no logs, no caches.
STORE_FILES = ("index.h5", "manifest.json", "shards")


def copied_store(root: Path, whole_run: bool = False) -> Path:
    """The checked-in 2-shard store (6 samples, 135 tokens): as its run left it (with
    prepared/), or only the files a user copies."""
    if whole_run:
        shutil.copytree(STORE_V2, root)
        return root
    root.mkdir()
    for name in STORE_FILES:
        source = STORE_V2 / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / name)
    return root


def snapshot(root: Path, leave_out: str | None = None) -> dict:
    """Every file and folder under ``root`` with its size and mtime."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if leave_out is None or not relative.startswith(leave_out):
            info = path.stat()
            found[relative] = (info.st_size, info.st_mtime_ns, path.is_dir())
    return found


def run_main(main, *argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_status_and_verify_write_nothing_into_a_copied_store(tmp_path, user_cache, capsys):
    store = copied_store(tmp_path / "store")
    before = snapshot(store)
    for _ in range(2):  # the second status takes its results from the cache
        code, text = run_main(status_main, store, capsys=capsys)
        assert code == 0
        assert f"{store}: a gathered store, no run state here: 2 shards, 6 samples, " in text
        assert "135 tokens" in text and "prepare has not finished" not in text
        code, text = run_main(verify_main, store, capsys=capsys)
        assert code == 0 and text.startswith("OK: ")
        assert snapshot(store) == before
    # Its quick check was kept in the user's cache folder, keyed by the store's path.
    assert [p.name for p in user_cache.rglob("*.json")] == ["status_checks.json"]


def test_status_of_a_run_writes_only_into_its_own_state(tmp_path, user_cache, capsys):
    run = copied_store(tmp_path / "run", whole_run=True)
    before = snapshot(run, leave_out="prepared")
    code, text = run_main(status_main, run, capsys=capsys)
    assert code == 0 and "done 2" in text and "all shards done and gathered" in text
    assert snapshot(run, leave_out="prepared") == before
    assert RunLayout(run).status_checks.is_file() and not user_cache.exists()


def test_status_goes_on_when_its_cache_cannot_be_written(tmp_path, monkeypatch, capsys):
    # No user cache folder can be made (its parent is a regular file) ...
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    store = copied_store(tmp_path / "store")
    before = snapshot(store)
    code, text = run_main(status_main, store, capsys=capsys)
    assert code == 0 and "a gathered store, no run state here: 2 shards" in text
    assert snapshot(store) == before
    # ... and a run's cache file cannot be written (where its temp file goes is a folder,
    # as the cache of older versions, beside the store's files, and the run's own).
    run = copied_store(tmp_path / "run", whole_run=True)
    for blocked in (run / ".status_checks.json.partial", RunLayout(run).status_checks):
        (blocked.parent / (blocked.name.removesuffix(".partial") + ".partial")).mkdir()
    code, text = run_main(status_main, run, capsys=capsys)
    assert code == 0 and "done 2" in text


@pytest.mark.parametrize(
    "damage",
    ["[1, 2]", "{not json", '{"expected": {}, "shards": {"0": "x"}}', '{"shards": {"0": {}}}'],
)
def test_a_damaged_status_cache_is_ignored_with_one_warning(tmp_path, caplog, capsys, damage):
    run = copied_store(tmp_path / "run", whole_run=True)
    layout = RunLayout(run)
    expected = {k: v for k, v in json.loads(layout.manifest.read_text()).items() if k in EXPECT}
    damage = damage.replace('"expected": {}', f'"expected": {json.dumps(expected)}')
    for path in (run / ".status_checks.json", layout.status_checks):  # old place and new
        path.write_text(damage)
    with caplog.at_level(logging.WARNING):
        code, text = run_main(status_main, run, capsys=capsys)
    assert code == 0 and "done 2" in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(layout.status_checks) in warnings[0], warnings
    assert "it is rebuilt" in warnings[0]
    assert json.loads(layout.status_checks.read_text())["shards"].keys() == {"0", "1"}


EXPECT = ("top_k", "teacher_fingerprint", "tokenizer_fingerprint", "config_fingerprint")


def test_orphaned_shards_are_reported_and_pruned_only_when_asked(tmp_path, capsys):
    run = copied_store(tmp_path / "run", whole_run=True)
    layout = RunLayout(run)
    # What a plan of 4 shards left after the plan was made again with 2.
    old = layout.shard(0).read_bytes()
    layout.shard(2).write_bytes(old)
    layout.parts_dir(2).mkdir()
    os.link(layout.shard(2), layout.parts_dir(2) / "assembled.h5")  # the kept copy
    (layout.parts_dir(2) / "assembled.json").write_text("{}")
    layout.shard(3).write_bytes(old[:1000])
    layout.shard_lock(3).touch()
    state = collect(run)
    assert state["orphans"] == {"shards": [2, 3], "paths": 4, "bytes": len(old) + 1000 + 2}
    text = render(state)
    assert "2 shard(s) no plan owns any more (2, 3): 4 files or folders" in text
    assert f"teacher-logits prune {run}` lists them" in text
    code, text = run_main(verify_main, run, capsys=capsys)
    assert code == 0 and "note: 2 shard(s) no plan owns any more" in text

    kept = snapshot(run)
    code, text = run_main(prune_main, run, capsys=capsys)
    assert code == 0 and f"would remove {layout.parts_dir(2)}/" in text
    assert "run again with --yes" in text
    kept.pop(".run.lock", None)
    assert {k: v for k, v in snapshot(run).items() if k != ".run.lock"} == kept

    code, text = run_main(prune_main, run, "--yes", capsys=capsys)
    assert code == 0 and f"removed {layout.shard(3)}" in text
    assert sorted(p.name for p in layout.shards_dir.iterdir()) == [
        "shard_00000.h5",
        "shard_00001.h5",
    ]
    assert collect(run)["orphans"]["paths"] == 0
    assert verify_main([str(run)]) == 0
    code, text = run_main(prune_main, run, capsys=capsys)
    assert code == 0 and "nothing to prune" in text
