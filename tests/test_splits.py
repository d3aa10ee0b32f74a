"""Store views: ``LogitStore.split`` and ``select`` read like the whole store.

On the checked-in store (tests/data/store_v2: 6 samples, 2 shards) and on a gathered
run of 8 small shards (built once per module, real gather, no Snakemake).
"""

import pickle

import numpy as np
import pytest
import torch

from teacher_logits import LogitStore
from teacher_logits import distill as distill_module
from teacher_logits.errors import TrainingInputError, UserError
from teacher_logits.gather import gather
from teacher_logits.store import StoreView
from teacher_logits.store import views as views_module
from teacher_logits.training import ShardLocalBatchSampler, collate

from test_reader_scale import STORE_V2, build_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 shards of 3 samples (ids 0..23), gathered."""
    layout = build_run(tmp_path_factory.mktemp("splits") / "run", 8)
    gather(layout, workers=1)
    return layout.output_dir


def same_record(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if name == "logsumexp_t":
            assert all(np.array_equal(value[t], b[name][t]) for t in value)
        else:
            np.testing.assert_array_equal(value, b[name], err_msg=name)


def test_split_is_disjoint_covers_the_store_and_agrees_with_distill(run):
    store = LogitStore(run)
    train, held = store.split(0.25, seed=0)
    ids = set(store.sample_ids.tolist())
    assert set(train.sample_ids) | set(held.sample_ids) == ids
    assert not set(train.sample_ids) & set(held.sample_ids)
    # snakemake distill's held-out samples are these: one function decides both.
    assert distill_module.holdout_mask is views_module.holdout_mask
    expected = store.sample_ids[distill_module.holdout_mask(store.sample_ids, 0.25)]
    np.testing.assert_array_equal(held.sample_ids, expected)
    # Each view reads its samples as the store does, in sample-id order.
    for view in (train, held):
        assert len(view) == len(view.sample_ids) and np.all(np.diff(view.sample_ids) > 0)
        assert view.num_tokens == sum(len(view[i]["input_ids"]) for i in range(len(view)))
        for i in (0, -1):
            same_record(view[i], store.by_sample_id(int(view.sample_ids[i])))
        same_record(view.by_sample_id(int(view.sample_ids[0])), view[0])
        assert (view.top_k, view.vocab_size, view.temperatures) == (
            store.top_k,
            store.vocab_size,
            store.temperatures,
        )
    with pytest.raises(KeyError, match="not in this view"):
        train.by_sample_id(int(held.sample_ids[0]))
    with pytest.raises(IndexError):
        held[len(held)]
    # Another seed, another split; a split of a view stays inside it.
    other = store.split(0.25, seed=1)[1]
    assert not np.array_equal(other.sample_ids, held.sample_ids)
    inner_train, inner_held = train.split(0.5, seed=3)
    assert set(inner_train.sample_ids) | set(inner_held.sample_ids) == set(train.sample_ids)
    store.close()


def test_seeds_give_independent_splits_of_the_same_size():
    ids = np.arange(100_000, dtype=np.int64)
    a = views_module.holdout_mask(ids, 0.1, seed=0)
    b = views_module.holdout_mask(ids, 0.1, seed=7)
    assert abs(a.mean() - 0.1) < 0.005 and abs(b.mean() - 0.1) < 0.005
    # Independent: about 10% of one split's held-out ids are held out by the other.
    assert abs((a & b).sum() / a.sum() - 0.1) < 0.02


def test_select_keeps_the_given_ids_in_sample_id_order(run):
    store = LogitStore(run)
    chosen = store.select([17, 2, 9, 2])
    assert chosen.sample_ids.tolist() == [2, 9, 17]
    assert [chosen[i]["sample_id"] for i in range(3)] == [2, 9, 17]
    assert chosen.select([9]).sample_ids.tolist() == [9]
    same_record(chosen.by_sample_id(17), store.by_sample_id(17))
    store.close()


def test_sampler_collate_and_a_dataloader_with_workers_take_a_view(run):
    store = LogitStore(run)
    train, _ = store.split(0.25)
    clone = pickle.loads(pickle.dumps(train))
    assert isinstance(clone, StoreView)
    np.testing.assert_array_equal(clone.sample_shard, train.sample_shard)
    # The view pickles as its store (no open shards) and its positions only.
    assert len(pickle.dumps(train)) < len(pickle.dumps(store)) + 8 * len(train) + 200

    sampler = ShardLocalBatchSampler(train, max_tokens=40, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(train)))
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=batches, collate_fn=collate, num_workers=2
    )
    for indices, batch in zip(batches, loader, strict=True):
        expected = collate([store.by_sample_id(int(train.sample_ids[i])) for i in indices])
        assert torch.equal(batch["input_ids"], expected["input_ids"])
        assert torch.equal(batch["topk_logprobs"], expected["topk_logprobs"])
    store.close()


@pytest.mark.parametrize("holdout", [0, 1, 1.5, -0.1, float("nan"), "a lot", None, True])
def test_a_holdout_outside_zero_one_is_one_line(holdout):
    store = LogitStore(STORE_V2)
    with pytest.raises(TrainingInputError) as refused:
        store.split(holdout)
    message = str(refused.value)
    assert "\n" not in message and "strictly between 0 and 1" in message
    assert isinstance(refused.value, UserError)


def test_an_empty_split_or_selection_is_one_line():
    store = LogitStore(STORE_V2)  # 6 samples: 1e-6 holds none out, 0.999999 all of them
    for holdout, words in ((1e-6, "held-out part empty"), (0.999999, "training part empty")):
        with pytest.raises(TrainingInputError, match=words) as refused:
            store.split(holdout)
        assert "use a " in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(TrainingInputError, match="no sample ids; pass at least one"):
        store.select([])
    known = int(store.sample_ids[0])
    with pytest.raises(TrainingInputError, match=r"1 of the 2 sample ids are not in the store"):
        store.select([known, 10**9])
    with pytest.raises(TrainingInputError, match="integer sample ids"):
        store.select([0.5])
    with pytest.raises(TrainingInputError, match="seed"):
        store.split(0.5, seed=-1)
