"""Gather's check cache: a rerun checks only new or changed shards, hashes come from the
workers that checked them, and a broken cache only costs a full check.

Runs are built without a teacher by bench/synthetic_run.py (real prepare files, real
shards through ShardWriter), and gathered by the real gather with real worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import h5py
import pytest

from teacher_logits.errors import ShardError
from teacher_logits.fingerprints import file_sha256
from teacher_logits.gather import gather
from teacher_logits.store.validation_cache import file_identity, hash_unchanged

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synthetic_run import RunShape, build_run, replace_shards  # noqa: E402

SHAPE = RunShape(num_shards=6, tokens_per_shard=300, vocab_size=512, top_k=8, pool_rows=256)


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path / "run", SHAPE, workers=1)


def gather_counting(layout, caplog) -> tuple[int, int]:
    """Gather again (as Snakemake does: without the old index); (shards checked now,
    shards taken from the cache), from gather's own log line."""
    for path in (layout.index, layout.manifest):
        path.unlink(missing_ok=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gather"):
        gather(layout, workers=2)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checking ")]
    checked, unchanged = re.match(r"checking (\d+) shards.*; (\d+) unchanged", line).groups()
    return int(checked), int(unchanged)


def manifest_shards(layout) -> dict:
    return {s["index"]: s for s in json.loads(layout.manifest.read_text())["shards"]}


def test_manifest_hashes_come_from_the_workers_and_equal_the_files(run, caplog):
    assert gather_counting(run, caplog) == (6, 0)
    shards = manifest_shards(run)
    for index, entry in shards.items():
        path = run.shard(index)
        assert entry["sha256"] == file_sha256(path)
        assert entry["bytes"] == path.stat().st_size
    # The cached run writes the same entries (nothing re-read) and the index is whole.
    assert gather_counting(run, caplog) == (0, 6)
    assert manifest_shards(run) == shards


def test_a_replaced_shard_is_checked_again_and_an_untouched_one_is_not(run, caplog):
    gather_counting(run, caplog)
    before = manifest_shards(run)
    replace_shards(run, SHAPE, [2], workers=1)
    assert gather_counting(run, caplog) == (1, 5)
    after = manifest_shards(run)
    assert after[2]["sha256"] == file_sha256(run.shard(2)) != before[2]["sha256"]
    assert {i: after[i] for i in after if i != 2} == {i: before[i] for i in before if i != 2}

    # Shard 4's rows damaged in place, its size and mtime put back (as cp -p would): its
    # ctime moved, which nothing sets back, so it is checked again, and refused.
    untouched = run.shard(4)
    stat = untouched.stat()
    with h5py.File(untouched, "r") as handle:
        offset = handle["topk_logits"].id.get_chunk_info(0).byte_offset
    with open(untouched, "r+b") as handle:
        handle.seek(offset + 16)
        byte = handle.read(1)
        handle.seek(offset + 16)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(untouched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_identity(untouched)[:3] == [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    with pytest.raises(ShardError, match=r"1 shard\(s\) failed validation \(shard 4\)"):
        gather_counting(run, caplog)
    # The bad shard left the cache; the good ones stayed in it.
    entries = json.loads(run.gather_checks.read_text())["shards"]
    assert sorted(entries) == ["0", "1", "2", "3", "5"]


def test_a_corrupt_cache_file_means_checking_everything(run, caplog):
    gather_counting(run, caplog)
    cache = run.gather_checks
    damages = (
        '{"version": 1, "shards": {"0": {"file": 3}}',
        "\0garbage",
        "",
        "[1, 2]",
        '{"version": 1, "shards": {"0": "x"}}',
        '{"version": 1, "shards": [1]}',
    )
    for damage in damages:
        cache.write_text(damage)
        assert gather_counting(run, caplog) == (6, 0)
        assert len(json.loads(cache.read_text())["shards"]) == 6
        # One warning line names the file; the rebuilt cache is read without one.
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert str(cache) in warning and "it is rebuilt" in warning
    assert not list(cache.parent.glob("*.partial"))


def test_a_changed_plan_entry_checks_that_shard_again(run, caplog):
    gather_counting(run, caplog)
    plan = json.loads(run.plan.read_text())
    plan["shards"][3]["tokens_digest"] = "recorded by a newer prepare"
    run.plan.write_text(json.dumps(plan))
    assert gather_counting(run, caplog) == (1, 5)
    # A run-wide expectation (the fingerprint every shard must carry) checks them all.
    plan["config_fingerprint"] = "another config"
    run.plan.write_text(json.dumps(plan))
    with pytest.raises(ShardError, match=r"6 shard\(s\) failed validation \(shards 0-5\)"):
        gather_counting(run, caplog)


def test_shards_need_not_agree_on_num_shards(run, caplog):
    """Shards planned before data was appended record a smaller total."""
    with h5py.File(run.shard(1), "r+") as handle:
        handle.attrs["num_shards"] = 2
    assert gather_counting(run, caplog) == (6, 0)
    with h5py.File(run.index, "r") as index:
        assert index.attrs["num_shards"] == 6


def test_a_hash_of_a_file_replaced_after_its_check_is_refused(run):
    path = run.shard(0)
    identity = file_identity(path)
    assert hash_unchanged(path, identity, lambda: None) == file_sha256(path)
    replace_shards(run, SHAPE, [0], workers=1)
    with pytest.raises(ShardError, match="changed while gather checked it"):
        hash_unchanged(path, identity, lambda: None)
