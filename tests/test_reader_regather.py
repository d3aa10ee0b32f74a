"""A reader left open while its store is regathered: every read returns the values of the
store that was opened (from the shard files it holds open) or raises one line
(``StoreError``: the store was regathered; open it again), never another store's record.

The library test writes shards directly (``test_shard_format``'s writer) and replaces
them by rename, as a regenerate does; the slow test regathers a real run twice and
compares what the open reader returns with the teacher's own forward.
"""

from __future__ import annotations

import re
import shutil
import time

import h5py
import numpy as np
import pytest

from teacher_logits import LogitStore
from teacher_logits.errors import StoreError
from teacher_logits.gather import gather

from test_reader_scale import FINGERPRINTS, SAMPLES_PER_SHARD, assert_same, build_run, direct
from test_shard_format import make_data, write_shard

REGATHERED = r"^the store at .+ was regathered after it was opened \({}.*\); open it again$"


def replace_shard(layout, shard: int, *, seed: int, num_samples=SAMPLES_PER_SHARD, skip=0, **attrs):
    """Shard ``shard`` made again, as a regenerate makes it: other values, a new
    ``finished_at``, written beside it and renamed over the old file. ``skip``: its
    sample ids start this many further on."""
    data = make_data(seed=seed, num_samples=num_samples)
    data.sample_ids = shard * SAMPLES_PER_SHARD + skip + np.arange(num_samples)
    data.attrs = {
        **data.attrs,
        **FINGERPRINTS,
        "shard_index": shard,
        "num_shards": 3,
        "finished_at": time.time(),
        **attrs,
    }
    write_shard(layout.shard(shard), data)


def test_an_open_reader_reads_the_files_it_holds_and_refuses_regenerated_ones(tmp_path):
    layout = build_run(tmp_path / "run", 3)
    gather(layout, workers=1)
    before = direct(layout)
    # Copied whole (cp -r: new inodes, new mtimes) before it is opened: read as the original.
    copy = tmp_path / "copy"
    shutil.copytree(layout.output_dir, copy, copy_function=shutil.copy)
    with LogitStore(copy, max_open_shards=1) as copied:
        for i in range(len(copied)):
            assert_same(copied[i], before[int(copied.sample_ids[i])])

    store = LogitStore(layout.output_dir, max_open_shards=2)
    store[0]
    store[SAMPLES_PER_SHARD]  # shards 0 and 1 open
    layout.index.unlink()  # what Snakemake does before gather runs again
    for shard, seed in ((0, 10), (1, 11)):
        replace_shard(layout, shard, seed=seed)
    replace_shard(layout, 2, seed=12, num_samples=2)
    # Shards 0 and 1 are read from the files opened before they were replaced.
    for i in range(2 * SAMPLES_PER_SHARD):
        assert_same(store[i], before[i])
    # Shard 2 was opened after: refused, and shard 0 made room for it (the LRU).
    with pytest.raises(StoreError, match=REGATHERED.format("shard 2: finished_at")) as raised:
        store[2 * SAMPLES_PER_SHARD]
    assert "num_samples 2, the index says 3" in str(raised.value)
    assert "\n" not in str(raised.value)
    # Shard 0, evicted and opened again: the new file, refused too.
    with pytest.raises(StoreError, match=REGATHERED.format("shard 0: finished_at")):
        store[0]
    assert_same(store[SAMPLES_PER_SHARD], before[SAMPLES_PER_SHARD])  # still held open
    store.close()
    with pytest.raises(StoreError, match=REGATHERED.format("shard 1: finished_at")):
        store[SAMPLES_PER_SHARD]
    layout.shard(2).unlink()  # deleted by a regenerate still running
    with pytest.raises(StoreError, match=r"shard_00002.h5 is gone since the store at .+ opened"):
        store[2 * SAMPLES_PER_SHARD]


def test_a_partial_reader_pins_the_shards_it_found(tmp_path):
    layout = build_run(tmp_path / "run", 3)
    before = direct(layout)
    store = LogitStore(layout.output_dir, partial=True, max_open_shards=1)
    assert_same(store[0], before[0])
    replace_shard(layout, 1, seed=11)
    with pytest.raises(StoreError, match=REGATHERED.format("shard 1: finished_at")):
        store[SAMPLES_PER_SHARD]
    assert_same(store[2 * SAMPLES_PER_SHARD], before[2 * SAMPLES_PER_SHARD])


def test_an_index_without_finished_at_falls_back_to_fingerprints_counts_and_ids(tmp_path):
    """Indexes gathered before ``shard_finished_at`` was recorded read as before; what
    they record (fingerprints, each shard's samples) still refuses most regenerates."""
    layout = build_run(tmp_path / "run", 3)
    gather(layout, workers=1)
    before = direct(layout)
    with h5py.File(layout.index, "r+") as index:
        del index["shard_finished_at"]
    store = LogitStore(layout.output_dir, max_open_shards=1)
    assert store.shard_finished_at is None
    assert_same(store[0], before[0])
    replace_shard(layout, 0, seed=10, config_fingerprint="cfg-other")
    replace_shard(layout, 1, seed=11, num_samples=2)
    # The same count, the ids one further on: the open check passes, the read does not.
    replace_shard(layout, 2, seed=12, skip=1)
    assert_same(store[1], before[1])  # shard 0's old file, still open
    with pytest.raises(StoreError, match=REGATHERED.format("shard 1: num_samples 2")):
        store[SAMPLES_PER_SHARD]
    with pytest.raises(StoreError, match=REGATHERED.format("shard 0: config_fingerprint")):
        store[0]
    with pytest.raises(StoreError, match=REGATHERED.format("shard 2 holds sample 7 at")):
        store[2 * SAMPLES_PER_SHARD]


# --- a real run, regathered under an open reader --------------------------------------

RUN = {
    "num_shards": 3,
    "dataset": {"max_samples": 20},
    "teacher": {"dtype": "float32"},
    "storage": {"value_dtype": "float32"},
    "generation": {"top_k": 8, "threads": 1},
}
OUT = "results/demo"


def assert_teacher(model, record: dict, top_k: int) -> None:
    """The record holds the teacher's own top-k and logsumexp for its tokens."""
    import torch

    assert record["topk_logits"].shape == (len(record["input_ids"]), top_k)
    with torch.no_grad():
        logits = model(torch.from_numpy(record["input_ids"].astype(np.int64))[None]).logits[0]
    values = torch.topk(logits, top_k, -1).values.numpy()
    np.testing.assert_allclose(record["topk_logits"], values, atol=1e-4, rtol=1e-5)
    lse = torch.logsumexp(logits, -1).numpy()
    np.testing.assert_allclose(record["logsumexp"], lse, atol=1e-4, rtol=1e-5)


def read_through(store, model, before: dict, top_k: int) -> list:
    """Each sample read in turn: the record the store held when it was opened (and the
    teacher's own numbers), or the one-line error. The positions refused."""
    refused = []
    for i in range(len(store)):
        try:
            record = store[i]
        except StoreError as exc:
            assert re.match(REGATHERED.format(""), str(exc)) and "\n" not in str(exc)
            refused.append(i)
            continue
        assert_same(record, before[record["sample_id"]])
        assert record["sample_id"] == store.sample_ids[i]
        assert_teacher(model, record, top_k)
    return refused


@pytest.mark.slow
def test_a_reader_open_across_regathers_returns_its_own_store_or_one_line(workflow, demo_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "teacher", dtype=torch.float32).eval()
    workflow.run("--cores", "2", config=RUN)
    out = workflow.path(OUT)
    with LogitStore(out) as fresh:
        before = {int(fresh.sample_ids[i]): fresh[i] for i in range(len(fresh))}
    store = LogitStore(out, max_open_shards=2)
    assert store.top_k == 8 and len(store) == 20
    shard = np.asarray(store.sample_shard)
    first_of = [int(np.flatnonzero(shard == s)[0]) for s in range(3)]
    store[first_of[0]]
    store[first_of[1]]  # shards 0 and 1 open

    # top_k 8 -> 4: every shard regenerated and the store gathered again.
    workflow.run("--cores", "2", config={**RUN, "generation": {"top_k": 4, "threads": 1}})
    refused = read_through(store, model, before, top_k=8)
    # Shards 0 and 1 come from the files held open; shard 2 is refused.
    assert refused == [i for i in range(20) if shard[i] == 2]
    with pytest.raises(StoreError, match="regathered after it was opened"):
        store[first_of[0]]  # evicted for shard 2, opened again: the new file
    store.close()
    with LogitStore(out) as reopened:  # opened again, as the error says: the new store
        assert reopened.top_k == 4
        before = {int(reopened.sample_ids[i]): reopened[i] for i in range(len(reopened))}
        for i in range(0, 20, 3):
            assert_teacher(model, reopened[i], top_k=4)

    # max_samples 20 -> 17: the shards' boundaries move.
    store = LogitStore(out, max_open_shards=1)
    store[0]
    smaller = {**RUN, "dataset": {"max_samples": 17}, "generation": {"top_k": 4, "threads": 1}}
    workflow.run("--cores", "2", config=smaller)
    refused = read_through(store, model, before, top_k=4)
    shard = np.asarray(store.sample_shard)
    # Shard 0 is read from the file held open until shard 1 takes its place.
    assert refused == [i for i in range(20) if shard[i] != 0]
    store.close()
    with LogitStore(out) as reopened:
        assert len(reopened) == 17
