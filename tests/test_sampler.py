"""ShardLocalBatchSampler: token-budget batches of similar lengths, each rank reading
whole shards or long runs of one, the same number of batches on every rank, every
sample once per epoch, deterministic, resumable, fast on a store of 10^6 samples."""

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from teacher_logits import LogitStore
from teacher_logits.errors import TrainingInputError
from teacher_logits.training import ShardLocalBatchSampler
from teacher_logits.training.sampler import MAX_SHARDS_PER_POOL

STORE_V2 = Path(__file__).parent / "data" / "store_v2"


class FakeStore:
    """What the sampler reads of a store, without HDF5."""

    def __init__(self, sample_shard, sample_length):
        self.sample_shard = np.asarray(sample_shard)
        self.sample_length = np.asarray(sample_length)

    def __len__(self):
        return len(self.sample_shard)


def long_tailed_store(num_samples=20_000, num_shards=40, seed=0, max_length=4096) -> FakeStore:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(5.0, 1.0, num_samples).astype(np.int64) + 1, max_length)
    # Shards hold contiguous sample ids, as prepare writes them.
    shards = np.sort(rng.integers(0, num_shards, num_samples))
    return FakeStore(shards, lengths)


def epoch_batches(store, world_size, **kw) -> list[list[list[int]]]:
    """Every rank's batches of one epoch, rank by rank."""
    return [
        list(ShardLocalBatchSampler(store, rank=r, world_size=world_size, **kw))
        for r in range(world_size)
    ]


def padding_fraction(batches, lengths) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / padded


SMALL = FakeStore([0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 3, 9, 4, 4, 12, 1, 7, 2])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("store", [SMALL, long_tailed_store(3000, 7)], ids=["3 shards", "7 shards"])
def test_without_drop_last_every_sample_once_and_ranks_padded_with_the_first_batches(
    store, world_size
):
    ranks = epoch_batches(store, world_size, max_tokens=20)
    assert len({len(r) for r in ranks}) == 1
    assert all(len(r) == len(ShardLocalBatchSampler(store, 20, 0, world_size)) for r in ranks)
    in_order = [b for r in ranks for b in r]
    epoch = ShardLocalBatchSampler(store, 20)  # one rank sees the epoch's own batch list
    unique = list(epoch)
    assert sorted(i for b in unique for i in b) == list(range(len(store)))
    # Ranks take contiguous slices of the epoch; the padding wraps to its first batches.
    assert in_order == [unique[i % len(unique)] for i in range(len(in_order))]
    assert len(in_order) - len(unique) < world_size


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("store", [SMALL, long_tailed_store(3000, 7)], ids=["3 shards", "7 shards"])
def test_with_drop_last_the_remainder_is_dropped_and_nothing_repeats(store, world_size):
    ranks = epoch_batches(store, world_size, max_tokens=20, drop_last=True)
    unique = list(ShardLocalBatchSampler(store, 20))
    per_rank = len(unique) // world_size
    assert [len(r) for r in ranks] == [per_rank] * world_size
    assert [b for r in ranks for b in r] == unique[: per_rank * world_size]


def test_more_ranks_than_batches_still_gives_every_rank_a_batch():
    store = FakeStore([0, 0, 1], [3, 3, 3])
    ranks = epoch_batches(store, 5, max_tokens=100)
    assert [len(r) for r in ranks] == [1] * 5
    assert sorted({i for r in ranks for b in r for i in b}) == [0, 1, 2]
    assert epoch_batches(store, 5, max_tokens=100, drop_last=True) == [[]] * 5


def test_batches_stay_within_the_budget():
    store = long_tailed_store()
    for max_tokens, max_length in [(4096, None), (2048, None), (1024, 512)]:
        sampler = ShardLocalBatchSampler(store, max_tokens, max_length=max_length)
        capped = np.minimum(store.sample_length, max_length or 1 << 40)
        for batch in sampler:
            if capped[batch].max() > max_tokens:
                assert len(batch) == 1
            else:
                assert len(batch) * capped[batch].max() <= max_tokens


def test_big_shards_are_batched_alone_and_small_ones_with_a_few_neighbours():
    store = long_tailed_store(num_samples=20_000, num_shards=40)  # ~60k tokens a shard
    alone = ShardLocalBatchSampler(store, max_tokens=1024, pool_batches=32)
    assert all(len(set(store.sample_shard[b])) == 1 for b in alone)
    assert all(
        len(set(store.sample_shard[b])) == 1
        for b in ShardLocalBatchSampler(store, 8192, pool_batches=0)
    )
    pooled = list(ShardLocalBatchSampler(store, max_tokens=8192))
    spans = [np.ptp(store.sample_shard[b]) for b in pooled]
    assert max(spans) < MAX_SHARDS_PER_POOL and max(spans) > 0


def test_a_sample_longer_than_the_budget_is_a_batch_of_its_own():
    store = FakeStore([0, 0, 0, 0], [10, 500, 10, 10])
    batches = list(ShardLocalBatchSampler(store, max_tokens=100))
    assert sorted(map(sorted, batches)) == [[0, 2, 3], [1]]


def test_similar_lengths_make_little_padding_where_random_batches_make_much():
    store = long_tailed_store(num_samples=40_000, num_shards=40)
    lengths = store.sample_length
    batches = list(ShardLocalBatchSampler(store, max_tokens=16384))
    ours = padding_fraction(batches, lengths)
    shuffled = np.random.default_rng(1).permutation(len(store))
    baseline = padding_fraction(np.array_split(shuffled, len(store) // 16), lengths)
    assert ours < 0.10, ours
    assert baseline > 0.5 and baseline > 5 * ours, (baseline, ours)


def test_the_same_settings_give_the_same_batches_and_touch_no_global_random_state():
    store = long_tailed_store(5000, 10)
    np.random.seed(123)
    random.seed(123)
    numpy_state, python_state = np.random.get_state()[1].copy(), random.getstate()
    first = epoch_batches(store, 3, max_tokens=4096, seed=7)
    again = epoch_batches(store, 3, max_tokens=4096, seed=7)
    sampler = ShardLocalBatchSampler(store, 4096, rank=1, world_size=3, seed=7)
    assert first == again and list(sampler) == list(sampler) == first[1]
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert random.getstate() == python_state
    assert epoch_batches(store, 3, max_tokens=4096, seed=8) != first


def test_each_epoch_has_its_own_order_and_set_epoch_goes_back():
    store = long_tailed_store(5000, 10)
    sampler = ShardLocalBatchSampler(store, 4096, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0) == len(sampler)
    assert sorted(i for b in epoch1 for i in b) == list(range(len(store)))
    # Samples of equal length are shuffled too, so batches change, not only their order.
    assert {tuple(sorted(b)) for b in epoch1} != {tuple(sorted(b)) for b in epoch0}
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


@pytest.mark.parametrize("pass_steps", [False, True])
def test_a_state_saved_mid_epoch_resumes_with_exactly_the_remaining_batches(pass_steps):
    store = long_tailed_store(5000, 10)
    kw = dict(max_tokens=4096, rank=1, world_size=2, seed=5)
    sampler = ShardLocalBatchSampler(store, **kw)
    sampler.set_epoch(2)
    full = list(sampler)
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(9)]
    # A DataLoader fetches ahead: the loop says how many steps it really finished.
    state = sampler.state_dict(batches_done=7) if pass_steps else sampler.state_dict()
    done = 7 if pass_steps else 9
    assert taken == full[:9] and state["batches_done"] == done and state["epoch"] == 2

    resumed = ShardLocalBatchSampler(store, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop sets the epoch again: the resume point stays
    assert list(resumed) == full[done:]
    assert resumed.state_dict()["batches_done"] == len(full)
    assert list(resumed) == full  # the resume applies to one iteration only
    resumed.set_epoch(3)
    sampler.set_epoch(3)
    assert list(resumed) == list(sampler)


@pytest.mark.parametrize(
    "key, value", [("seed", 1), ("world_size", 3), ("max_tokens", 1024), ("max_length", 64)]
)
def test_a_state_from_other_settings_is_refused_naming_the_setting(key, value):
    store = long_tailed_store(500, 3)
    state = ShardLocalBatchSampler(store, 4096, world_size=2).state_dict() | {key: value}
    with pytest.raises(TrainingInputError, match=f"{key}={value}") as error:
        ShardLocalBatchSampler(store, 4096, world_size=2).load_state_dict(state)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-5), "max_tokens"),
        (dict(max_tokens=10, world_size=0), "world_size"),
        (dict(max_tokens=10, rank=-1, world_size=2), "rank"),
        (dict(max_tokens=10, rank=2, world_size=2), "rank"),
        (dict(max_tokens=10, seed=-1), "seed"),
        (dict(max_tokens=10, max_length=0), "max_length"),
        (dict(max_tokens=10, max_length=1), "max_length"),
    ],
)
def test_bad_arguments_are_one_line_errors(kw, words):
    with pytest.raises(TrainingInputError, match=words) as error:
        ShardLocalBatchSampler(SMALL, **kw)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "max_tokens, pool_batches, extra",
    [(16384, 0, 2), (1024, 64, 2), (16384, 64, 2 * MAX_SHARDS_PER_POOL)],
)
def test_two_thousand_shards_of_a_million_samples_plan_fast_and_each_rank_reads_few_shards(
    million_samples, max_tokens, pool_batches, extra
):
    """Each rank reads about its share of the shards, plus those of the pools (one
    shard each where shards are big enough, as with max_tokens=1024) at its ends."""
    num_shards, world_size = 2000, 4
    for rank in range(world_size):
        sampler = ShardLocalBatchSampler(
            million_samples, max_tokens, rank=rank, world_size=world_size, pool_batches=pool_batches
        )
        sampler.set_epoch(1)
        batches = list(sampler)
        shards = set(np.concatenate([million_samples.sample_shard[b] for b in batches]).tolist())
        assert num_shards / world_size - extra <= len(shards) <= num_shards / world_size + extra


@pytest.fixture(scope="module")
def million_samples():
    return long_tailed_store(num_samples=1_000_000, num_shards=2000, seed=2)


def identity_collate(records):
    return records


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_dataloader_with_two_workers_reads_a_real_store_by_these_batches(tmp_path, world_size):
    from torch.utils.data import DataLoader

    shutil.copytree(STORE_V2, tmp_path / "store")
    store = LogitStore(tmp_path / "store")
    seen = []
    for rank in range(world_size):
        sampler = ShardLocalBatchSampler(store, max_tokens=48, rank=rank, world_size=world_size)
        loader = DataLoader(
            store, batch_sampler=sampler, collate_fn=identity_collate, num_workers=2
        )
        batches = list(loader)
        assert [[int(r["sample_id"]) for r in b] for b in batches] == [
            [int(store.sample_ids[i]) for i in b] for b in sampler
        ]
        assert all(sum(len(r["input_ids"]) for r in b) <= 48 for b in batches)
        seen += [int(r["sample_id"]) for b in batches for r in b]
    assert sorted(set(seen)) == sorted(int(s) for s in store.sample_ids)
