"""The reader at scale: a bounded set of open shards (an LRU), read-only opens without
HDF5 file locking, fork-safe handles, and partial mode (a run read before gather).

Real runs in tmp_path: shards written by ``ShardWriter``, prepare's token file and
plan, and an index written by the real ``gather``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from teacher_logits import LogitStore
from teacher_logits.errors import StoreError, TrainingInputError
from teacher_logits.gather import gather
from teacher_logits.layout import RunLayout
from teacher_logits.store.prepared import PreparedTokens, read_prepared, write_prepared
from teacher_logits.store.reader import DEFAULT_MAX_OPEN_SHARDS, read_sample

from conftest import REPO
from test_shard_format import TOP_K, VOCAB, make_data, write_shard

STORE_V2 = Path(__file__).parent / "data" / "store_v2"
SAMPLES_PER_SHARD = 3
FINGERPRINTS = {
    "teacher_fingerprint": "teacher-abc",
    "tokenizer_fingerprint": "tok-def",
    "config_fingerprint": "cfg-123",
}


def build_run(output_dir: Path, num_shards: int) -> RunLayout:
    """A finished run of ``num_shards`` small shards (prepare's files and every shard),
    not yet gathered. Sample ids are row numbers, shard after shard."""
    layout = RunLayout(output_dir)
    shards = []
    for i in range(num_shards):
        data = make_data(seed=i, num_samples=SAMPLES_PER_SHARD)
        data.sample_ids = np.arange(i, i + 1) * SAMPLES_PER_SHARD + np.arange(SAMPLES_PER_SHARD)
        data.attrs = {**data.attrs, **FINGERPRINTS, "shard_index": i, "num_shards": num_shards}
        write_shard(layout.shard(i), data)
        shards.append(data)
    lengths = np.concatenate([d.lengths for d in shards])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    write_prepared(
        layout.tokens,
        PreparedTokens(
            sample_ids=np.concatenate([d.sample_ids for d in shards]),
            offsets=offsets,
            input_ids=np.concatenate([d.input_ids for d in shards]),
            shard_bounds=np.arange(num_shards + 1, dtype=np.int64) * SAMPLES_PER_SHARD,
        ),
    )
    # The checked-in run's plan, for the settings and fields a plan always has.
    plan = json.loads((STORE_V2 / "prepared" / "plan.json").read_text())
    plan.pop("teacher_content_digest", None)
    plan["settings"]["generation"]["top_k"] = TOP_K
    plan.update(
        FINGERPRINTS,
        num_shards=num_shards,
        num_rows=len(lengths),
        num_samples=len(lengths),
        num_tokens=int(offsets[-1]),
        top_k=TOP_K,
        vocab_size=VOCAB,
        shards=[
            {"index": i, "num_samples": len(d.lengths), "num_tokens": int(d.offsets[-1])}
            for i, d in enumerate(shards)
        ],
        dropped=[],
    )
    layout.plan.write_text(json.dumps(plan))
    return layout


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> RunLayout:
    """40 shards, gathered by the real gather."""
    layout = build_run(tmp_path_factory.mktemp("many") / "run", 40)
    gather(layout, workers=1)
    return layout


def direct(layout: RunLayout) -> dict:
    """Every record, read by opening each shard on its own: {sample_id: record}."""
    records = {}
    for path in sorted(layout.shards_dir.glob("shard_*.h5")):
        with h5py.File(path, "r") as handle:
            for position in range(len(handle["sample_ids"])):
                record = read_sample(handle, position)
                records[record["sample_id"]] = record
    return records


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if name == "logsumexp_t":
            assert set(got[name]) == set(value)
            for t in value:
                np.testing.assert_array_equal(got[name][t], value[t])
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def open_shard_fds(layout: RunLayout) -> int:
    """Descriptors this process holds on the run's shard files."""
    shards = str(layout.shards_dir.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(shards)
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return count


# Run under a descriptor limit of 24: the interpreter, numpy and h5py hold about 6,
# so 40 shards cannot all be open at once, but 4 (and the index) can.
LOW_LIMIT_SCRIPT = """
import hashlib, json, resource, sys
import numpy as np
from teacher_logits import LogitStore
from teacher_logits.errors import TrainingInputError

resource.setrlimit(resource.RLIMIT_NOFILE, (24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
digests = {}
with LogitStore(sys.argv[1], max_open_shards=4) as store:
    for i in range(len(store)):
        rec = store[i]
        digest = hashlib.sha256()
        for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp", "entropy"):
            digest.update(np.ascontiguousarray(rec[name]).tobytes())
        digests[rec["sample_id"]] = digest.hexdigest()
failure = None
try:
    with LogitStore(sys.argv[1], max_open_shards=40) as store:  # as every shard kept open
        for i in range(len(store)):
            store[i]
except TrainingInputError as exc:
    failure = {"message": str(exc), "errno": exc.__cause__.errno}
print(json.dumps({"digests": digests, "failure": failure}))
"""


def test_every_sample_of_40_shards_is_read_under_a_descriptor_limit_of_24(many_shards):
    import hashlib

    result = subprocess.run(
        [sys.executable, "-c", LOW_LIMIT_SCRIPT, str(many_shards.output_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    expected = {}
    for sample_id, rec in direct(many_shards).items():
        digest = hashlib.sha256()
        for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp", "entropy"):
            digest.update(np.ascontiguousarray(rec[name]).tobytes())
        expected[str(sample_id)] = digest.hexdigest()
    assert len(expected) == 40 * SAMPLES_PER_SHARD and found["digests"] == expected
    # Keeping every shard open (what the reader did before the LRU) runs out of descriptors.
    assert found["failure"]["errno"] == 24
    assert "too many open files" in found["failure"]["message"]
    assert "lower max_open_shards or raise the limit (ulimit -n)" in found["failure"]["message"]


def test_the_lru_keeps_at_most_max_open_shards_open_and_reads_the_same_values(many_shards):
    want = direct(many_shards)
    order = np.random.default_rng(0).permutation(40 * SAMPLES_PER_SHARD)
    peak = 0
    with LogitStore(many_shards.output_dir, max_open_shards=4) as store:
        assert len(store) == 40 * SAMPLES_PER_SHARD
        for i in order:  # random order: the shard read next is often not open
            rec = store[int(i)]
            assert_same(rec, want[rec["sample_id"]])
            peak = max(peak, open_shard_fds(many_shards))
        assert peak == 4
        # A shard read again is moved to the front: reading 0, 1, 2, 3 then 0 again and
        # a fifth evicts shard 1, not shard 0.
        store.close()
        for shard in (0, 1, 2, 3, 0, 4):
            store[shard * SAMPLES_PER_SHARD]
        assert list(store._handles) == [2, 3, 0, 4]
    assert open_shard_fds(many_shards) == 0  # close() closed every one


def test_arguments_are_checked(many_shards):
    with pytest.raises(TrainingInputError, match=r"^max_open_shards=0: use 1 or more$"):
        LogitStore(many_shards.output_dir, max_open_shards=0)
    with pytest.raises(TrainingInputError, match=r"^chunk_cache_bytes=-1: use 0 or more$"):
        LogitStore(many_shards.output_dir, chunk_cache_bytes=-1)
    assert LogitStore(many_shards.output_dir).max_open_shards == DEFAULT_MAX_OPEN_SHARDS == 16


def test_every_open_is_read_only_without_file_locking_and_sizes_the_chunk_cache(
    many_shards, tmp_path, monkeypatch
):
    unfinished = build_run(tmp_path / "run", 2)
    calls = []
    real = h5py.File

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(h5py, "File", recording)
    with LogitStore(many_shards.output_dir, chunk_cache_bytes=123456) as store:
        store[0]
        store[len(store) - 1]
    with LogitStore(unfinished.output_dir, partial=True) as store:
        store[0]
    monkeypatch.undo()
    opened = [Path(args[0]).name for args, _ in calls]
    assert opened[:3] == ["index.h5", "shard_00000.h5", "shard_00039.h5"]
    # Partial mode: each shard's attributes, its tokens against prepare's, then the read.
    assert opened[3:] == [
        "shard_00000.h5",
        "tokens.h5",
        "shard_00000.h5",
        "shard_00001.h5",
        "tokens.h5",
        "shard_00001.h5",
        "shard_00000.h5",
    ]
    assert all(args[1] == "r" and kwargs["locking"] is False for args, kwargs in calls)
    assert calls[1][1]["rdcc_nbytes"] == 123456 and calls[2][1]["rdcc_nslots"] == 521


HOLD_WRITE_LOCK = """
import sys, h5py
with h5py.File(sys.argv[1], "r+", locking=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_shard_another_process_holds_locked_is_still_read(many_shards, tmp_path):
    """HDF5's locking takes an flock on every open; the reader takes none, so neither a
    filesystem without flock nor a lock held elsewhere stops it."""
    layout = RunLayout(tmp_path / "copy")
    shutil.copytree(many_shards.output_dir, layout.output_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(layout.shard(0))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OSError, match="lock"):  # a locking open fails here
            h5py.File(layout.shard(0), "r", locking=True)
        with LogitStore(layout.output_dir) as store:
            assert store[0]["sample_id"] == 0
    finally:
        holder.communicate("", timeout=30)


STORE = None  # the store forked workers inherit, as DataLoader workers do


def read_in_worker(indices) -> list:
    records = [STORE[i] for i in indices]
    pid = os.getpid()
    return [(pid, STORE._pid == pid, record) for record in records]


def test_forked_workers_open_their_own_handles_and_read_the_same_values(many_shards):
    global STORE
    want = direct(many_shards)
    STORE = LogitStore(many_shards.output_dir, max_open_shards=4)
    try:
        for i in range(0, len(STORE), SAMPLES_PER_SHARD * 10):  # the parent has shards open
            STORE[i]
        parent_open = list(STORE._handles)
        halves = np.array_split(np.arange(len(STORE)), 2)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(read_in_worker, [h.tolist() for h in halves])
        seen = [entry for part in results for entry in part]
        assert len(seen) == len(STORE)
        for pid, own_handles, rec in seen:
            assert pid != os.getpid() and own_handles
            assert_same(rec, want[rec["sample_id"]])
        # The parent's handles are its own still, and still read.
        assert list(STORE._handles) == parent_open
        assert_same(STORE[0], want[0])
        # A spawned worker gets the store pickled: without handles, reading on its own.
        copy = pickle.loads(pickle.dumps(STORE))
        assert len(copy._handles) == 0 and len(copy) == len(STORE)
        assert_same(copy[len(copy) - 1], want[int(STORE.sample_ids[-1])])
        copy.close()
    finally:
        STORE.close()
        STORE = None


def test_partial_mode_reads_exactly_the_finished_shards_of_this_plan(tmp_path):
    gathered = build_run(tmp_path / "gathered", 8)
    gather(gathered, workers=1)
    layout = RunLayout(tmp_path / "unfinished")
    shutil.copytree(gathered.output_dir, layout.output_dir)
    layout.index.unlink()
    layout.manifest.unlink()
    layout.shard(1).unlink()
    layout.shard(6).unlink()
    with h5py.File(layout.shard(2), "r+") as handle:  # another run's shard
        handle.attrs["config_fingerprint"] = "cfg-other"
    with open(layout.shard(5), "r+b") as handle:  # cut short by a failing copy
        handle.truncate(layout.shard(5).stat().st_size // 2)
    # A row of shard 4 edited and prepared again, every length kept: only its tokens differ.
    prepared = read_prepared(layout.tokens)
    prepared.input_ids[prepared.offsets[4 * SAMPLES_PER_SHARD] + 1] ^= 1
    write_prepared(layout.tokens, prepared)
    plan = json.loads(layout.plan.read_text())
    plan["shards"][7]["num_tokens"] += 1  # the plan changed since shard 7 was made
    layout.plan.write_text(json.dumps(plan))

    with pytest.raises(FileNotFoundError, match="partial=True"):
        LogitStore(layout.output_dir)
    with (
        LogitStore(gathered.output_dir) as full,
        LogitStore(layout.output_dir, partial=True) as store,
    ):
        assert store.partial and store.shards_missing == [1, 6]
        assert sorted(store.shards_skipped) == [2, 4, 5, 7]
        assert store.shards_skipped[2] == (
            "not this run's shard (attribute config_fingerprint='cfg-other', expected 'cfg-123')"
        )
        assert store.shards_skipped[5].startswith("not readable (OSError: ")
        assert store.shards_skipped[4].startswith("its token ids differ from what prepare now")
        planned = plan["shards"][7]["num_tokens"]
        assert store.shards_skipped[7] == f"holds {planned - 1} tokens, the plan has {planned}"
        kept = [0, 3]
        assert sorted(set(store.sample_shard.tolist())) == kept
        want_ids = [s * SAMPLES_PER_SHARD + k for s in kept for k in range(SAMPLES_PER_SHARD)]
        assert store.sample_ids.tolist() == want_ids and len(store) == len(want_ids)
        for i, sample_id in enumerate(want_ids):
            assert_same(store[i], full.by_sample_id(sample_id))
            assert store.sample_length[i] == len(store[i]["input_ids"])
        assert store.num_tokens == int(store.sample_length.sum())
        for name in ("top_k", "vocab_size", "temperatures", "has_loss_mask", "masked_only"):
            assert getattr(store, name) == getattr(full, name), name
        assert store.config_fingerprint == full.config_fingerprint == "cfg-123"
        with pytest.raises(KeyError):
            store.by_sample_id(SAMPLES_PER_SHARD)  # shard 1's first sample: not finished
        assert not full.partial and full.shards_missing == [] and full.shards_skipped == {}

    # Once gathered, partial=True reads the index.
    with LogitStore(gathered.output_dir, partial=True) as store:
        assert not store.partial and len(store) == 8 * SAMPLES_PER_SHARD


def test_partial_mode_before_prepare_says_what_is_missing(tmp_path):
    with pytest.raises(StoreError, match="no index.h5 and no plan at .*plan.json"):
        LogitStore(tmp_path, partial=True)
    # With nothing finished yet: an empty store that says every shard is missing.
    layout = build_run(tmp_path / "run", 3)
    for i in range(3):
        layout.shard(i).unlink()
    store = LogitStore(layout.output_dir, partial=True)
    assert len(store) == 0 and store.num_tokens == 0 and store.shards_missing == [0, 1, 2]
