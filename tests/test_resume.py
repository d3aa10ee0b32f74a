"""Survive kills: mid-shard resume from committed parts, no --unlock after kill -9,
bit-identical results, stale parts discarded, a full disk. (Out-of-memory splits:
test_out_of_memory.py.)"""

import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, demo_workflow

sys.path.insert(0, str(REPO))
from teacher_logits.generation.parts import CommittedParts, PartWriter, iter_part_rows  # noqa: E402
from teacher_logits.generation.provenance import claims_from_parts  # noqa: E402
from teacher_logits.store.format import read_attrs  # noqa: E402

# Two shards of ~14k tokens in windows of 32 x 64 = 2048 tokens, each window its own
# commit: a kill almost anywhere lands between committed parts.
RESUME = {
    "num_shards": 2,
    "dataset": {"max_samples": 300},
    "generation": {"batch_tokens": 64, "commit_every_s": 0, "threads": 1},
}
OUT = "results/demo"


# When each shard was finished (the reader pins shards by it): provenance, not content.
PROVENANCE = {"index.h5:shard_finished_at"}


def store_datasets(root: Path) -> dict:
    """Every dataset of every shard and of index.h5, keyed by file and name (provenance
    aside)."""
    out = {}
    for path in sorted((root / OUT / "shards").glob("shard_*.h5")) + [root / OUT / "index.h5"]:
        with h5py.File(path) as f:
            f.visit(
                lambda name, f=f, path=path: (
                    out.__setitem__(f"{path.name}:{name}", f[name][...])
                    if isinstance(f[name], h5py.Dataset)
                    else None
                )
            )
    return {key: value for key, value in out.items() if key not in PROVENANCE}


def assert_same_store(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture
def reference(tmp_path, demo_dir):
    """The store an uninterrupted run with the same config produces."""
    wf = demo_workflow(tmp_path / "reference", demo_dir)

    def build(config):
        wf.run("--cores", "1", config=config)
        return store_datasets(wf.root)

    return build


def kill_when(proc, ready, what: str, timeout: float = 600, group: bool = True):
    """SIGKILL the run (its whole process group, or Snakemake alone) once ``ready()``."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point: {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for the kill point: {what}")
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def committed_parts(wf, shard=0):
    return sorted(wf.path(OUT, "shards", f"shard_{shard:05d}.parts").glob("part_*.h5"))


def output_of(proc_log_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted(proc_log_dir.glob("background-*.log")))


@pytest.mark.slow
def test_kills_at_every_stage_resume_to_a_bit_identical_store(workflow, reference):
    expected = reference(RESUME)
    args = ("--cores", "1")

    # 1. During prepare.
    proc = workflow.start(*args, config=RESUME)
    kill_when(proc, lambda: workflow.path(OUT, "logs", "prepare.log").exists(), "prepare started")
    assert not workflow.path(OUT, "index.h5").exists()

    # 2. In the middle of shard 0, after some of its parts were committed.
    proc = workflow.start(*args, config=RESUME)
    kill_when(proc, lambda: len(committed_parts(workflow)) >= 2, "two parts of shard 0 committed")
    kept = committed_parts(workflow)
    assert kept and not workflow.path(OUT, "shards", "shard_00000.h5").exists()

    # 3. Between shards: shard 0 finished, shard 1 not.
    proc = workflow.start(*args, config=RESUME)
    kill_when(proc, lambda: workflow.path(OUT, "shards", "shard_00000.h5").exists(), "shard 0 done")
    log0 = workflow.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert "resuming shard_00000.parts" in log0, log0

    # 4. During gather.
    proc = workflow.start(*args, config=RESUME)
    kill_when(proc, lambda: "rule gather" in output_of(workflow.root), "gather scheduled")

    # The same command finishes the job: no --unlock, no --rerun-incomplete.
    final = workflow.run(*args, config=RESUME)
    assert "LockException" not in final.stderr
    assert_same_store(store_datasets(workflow.root), expected)
    # Gather drops the part files; each parts folder keeps only a link to its finished shard.
    assert not list(workflow.path(OUT, "shards").glob("*.parts/part_*")), "gather drops parts"

    with h5py.File(workflow.path(OUT, "shards", "shard_00000.h5")) as f:
        attrs = read_attrs(f)
    # Two claims worked on shard 0 (killed, then resumed); their rows add up.
    assert len(attrs["claims"]) >= 2
    assert sum(c["rows"] for c in attrs["claims"]) == f_rows(workflow, 0)
    assert attrs["started_at"] == attrs["claims"][-1]["started_at"]


def f_rows(wf, shard):
    with h5py.File(wf.path(OUT, "shards", f"shard_{shard:05d}.h5")) as f:
        return f["logsumexp"].shape[0]


@pytest.mark.slow
def test_kills_at_random_moments_resume_to_a_bit_identical_store(workflow, reference):
    expected = reference(RESUME)
    rng = random.Random(20261129)
    for _attempt in range(6):
        proc = workflow.start("--cores", "2", config=RESUME)
        time.sleep(rng.uniform(1.0, 12.0))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    workflow.run("--cores", "2", config=RESUME)
    assert_same_store(store_datasets(workflow.root), expected)


@pytest.mark.slow
def test_killing_only_snakemake_leaves_no_lock_and_orphans_do_not_collide(workflow, reference):
    expected = reference(RESUME)
    proc = workflow.start("--cores", "2", config=RESUME)
    # The generate jobs keep running as orphans while the same command starts again.
    kill_when(proc, lambda: len(committed_parts(workflow)) >= 1, "a part committed", group=False)
    workflow.run("--cores", "2", config=RESUME)
    assert_same_store(store_datasets(workflow.root), expected)


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused(workflow):
    proc = workflow.start("--cores", "1", config=RESUME)
    try:
        deadline = time.time() + 300
        while not committed_parts(workflow) and time.time() < deadline:
            assert proc.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = workflow.run("--cores", "1", config=RESUME, check=False)
        assert second.returncode == 1
        assert "another Snakemake run" in second.stderr and "output_dir" in second.stderr
        assert "Traceback" not in second.stderr
        # A plan never waits for or blocks a running workflow.
        workflow.run("-n", config=RESUME)
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert workflow.path(OUT, "index.h5").exists()


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"generation": {**RESUME["generation"], "top_k": 16}}, "top_k changed"),
        ({"force_regenerate": True}, "a regeneration was requested"),
    ],
)
@pytest.mark.slow
def test_parts_from_another_setting_are_discarded(workflow, change, reason):
    proc = workflow.start("--cores", "1", config=RESUME)
    kill_when(proc, lambda: len(committed_parts(workflow)) >= 1, "a part committed")
    workflow.run("--cores", "1", config={**RESUME, **change})
    log0 = workflow.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert "discarding" in log0 and reason in log0, log0
    assert "resuming" not in log0


@pytest.mark.slow
def test_disk_full_fails_clearly_keeps_earlier_work_and_resumes(workflow, reference):
    expected = reference(RESUME)
    workflow.run("--cores", "1", "--until", "prepare", config=RESUME)
    workflow.run("--cores", "1", OUT + "/shards/shard_00000.h5", config=RESUME)
    shard0 = workflow.path(OUT, "shards", "shard_00000.h5")
    before = (shard0.stat().st_mtime_ns, shard0.read_bytes())

    # No file may grow past 1.5 MiB: parts (~1 MB) fit, the assembled shard (~2 MB) does not.
    limit = 3 << 19

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = workflow.run("--cores", "1", config=RESUME, check=False, preexec_fn=small_disk)
    assert full.returncode != 0
    assert "disk full while writing" in full.stderr and "rerun the same command" in full.stderr
    assert "Traceback" not in full.stderr
    shards = workflow.path(OUT, "shards")
    assert not (shards / "shard_00001.h5").exists()
    assert not list(shards.glob("*.partial")) and not list(shards.glob("*/*.partial"))
    assert (shard0.stat().st_mtime_ns, shard0.read_bytes()) == before
    assert committed_parts(workflow, 1), "the parts committed before the disk filled are kept"

    # With space again, the same command resumes from the kept parts. (The shard is
    # written while rows are computed, so the disk may fill before every part is in.)
    workflow.run("--cores", "1", config=RESUME)
    log1 = workflow.path(OUT, "logs", "generate", "shard_00001.log").read_text()
    assert "resuming shard_00001.parts" in log1, log1
    assert_same_store(store_datasets(workflow.root), expected)


# --- the parts bookkeeping on its own ------------------------------------------------


def write_part(parts: CommittedParts, first_sample: int, first_row: int, rows: int, claim="0,1"):
    writer = PartWriter(parts.part_path(first_sample), first_sample, first_row)
    writer.append(
        2,
        {
            "topk_ids": np.arange(rows * 4, dtype=np.int32).reshape(rows, 4),
            "topk_logits": np.ones((rows, 4), np.float32),
            "logsumexp": np.full(rows, 3.0, np.float32),
            "entropy": np.zeros(rows, np.float32),
        },
    )
    path = writer.commit(
        {
            "claim_cuda_visible_devices": claim,
            "claim_hostname": "h",
            "claim_started_at": 1.0 if claim == "0,1" else 5.0,
            "committed_at": 2.0 + first_sample,
            "compute_seconds": 1.0,
        }
    )
    parts.add(path, read_attrs_of(path))


def read_attrs_of(path):
    with h5py.File(path) as f:
        return read_attrs(f)


IDENTITY = {"teacher_fingerprint": "t", "config_fingerprint": "c", "regenerate_token": "r"}


def test_committed_parts_keep_order_and_drop_gaps_and_temp_files(tmp_path):
    parts = CommittedParts(tmp_path / "p", IDENTITY, rows_total=100)
    write_part(parts, 0, 0, 10)
    write_part(parts, 2, 10, 7)
    write_part(parts, 6, 30, 5)  # samples 4-5 missing: a gap
    (tmp_path / "p" / "part_0000000009.h5.partial").write_bytes(b"half")

    again = CommittedParts(tmp_path / "p", IDENTITY, rows_total=100)
    assert (again.samples_done, again.rows_done) == (4, 17)
    assert [p.name for p in (tmp_path / "p").glob("part_*")] == sorted(
        p.name for p, _ in again.parts
    )
    assert len(again.parts) == 2
    blocks = list(iter_part_rows(again.parts[1][0], block_rows=4))
    assert [r0 for r0, _ in blocks] == [0, 4]
    assert np.concatenate([b["logsumexp"] for _, b in blocks]).tolist() == [3.0] * 7

    changed = CommittedParts(tmp_path / "p", {**IDENTITY, "teacher_fingerprint": "u"}, 100)
    assert changed.parts == [] and not list((tmp_path / "p").glob("part_*"))


def test_claims_merge_consecutive_parts_of_one_claim(tmp_path):
    parts = CommittedParts(tmp_path / "p", IDENTITY, rows_total=100)
    write_part(parts, 0, 0, 10)
    write_part(parts, 2, 10, 10)
    write_part(parts, 4, 20, 5, claim="2,3")
    claims = claims_from_parts([a for _, a in parts.parts])
    assert [(c["cuda_visible_devices"], c["rows"]) for c in claims] == [("0,1", 20), ("2,3", 5)]
    assert claims[0]["started_at"] == 1.0 and claims[0]["finished_at"] == 4.0


def test_parts_without_the_cross_tokenizer_fields_are_dropped_but_the_finished_copy_stays(
    tmp_path,
):
    """Parts written before the cross-tokenizer fields (no key in their record) cannot be
    joined with rows that carry ``target_logprob``; the finished copy can still be taken
    back (a store mixes shards with and without the fields), so it must survive."""
    older = {"config_fingerprint": "c"}  # a record from before the key existed
    parts = CommittedParts(tmp_path / "p", older, rows_total=100)
    write_part(parts, 0, 0, 10)
    parts.assembled_path.write_bytes(b"a finished shard, hard-linked")
    now = CommittedParts(tmp_path / "p", {**older, "cross_tokenizer_fields": True}, 100)
    assert now.rows_done == 0 and not list((tmp_path / "p").glob("part_*.h5"))
    assert now.assembled_path.read_bytes() == b"a finished shard, hard-linked"
    # Parts of a run without them are joined by a run without them, as before.
    write_part(now, 0, 0, 10)
    again = CommittedParts(tmp_path / "p", {**older, "cross_tokenizer_fields": True}, 100)
    assert again.rows_done == 10
    assert (
        CommittedParts(tmp_path / "p", {**older, "cross_tokenizer_fields": False}, 100).rows_done
        == 0
    )
