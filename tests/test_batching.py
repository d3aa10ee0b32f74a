"""Unit tests for teacher_logits.generation.batching: token-budget batches and windows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import teacher_logits.generation.batching as batching  # noqa: E402


def lognormal_lengths(n: int, seed: int, mean: float = 5.0, sigma: float = 0.9, cap: int = 8192):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean, sigma, n).astype(np.int64), 1, cap)


def check_plan(lengths: np.ndarray, batches: list[np.ndarray], budget: int) -> None:
    lengths = np.asarray(lengths)
    # every index exactly once
    flat = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) >= 1
        assert np.issubdtype(batch.dtype, np.integer)
        cost = len(batch) * int(lengths[batch].max())
        if cost > budget:
            assert len(batch) == 1 and lengths[batch[0]] > budget, (
                f"batch of {len(batch)} x {lengths[batch].max()} = {cost} > {budget}"
            )
    # longest first: the concatenated order is non-increasing in length
    ordered = lengths[flat]
    assert (np.diff(ordered) <= 0).all()


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("budget", [64, 1000, 4096, 16384])
def test_plan_batches_properties_random(seed, budget):
    lengths = lognormal_lengths(500, seed, cap=3 * budget)
    batches = batching.plan_batches(lengths, budget)
    check_plan(lengths, batches, budget)


def test_plan_batches_longest_first_and_stable():
    lengths = np.array([3, 10, 3, 7, 10, 1])
    batches = batching.plan_batches(lengths, 20)
    flat = np.concatenate(batches).tolist()
    # ties keep their original order (stable sort)
    assert flat == [1, 4, 3, 0, 2, 5]
    assert [b.tolist() for b in batches] == [[1, 4], [3, 0], [2, 5]]


def test_plan_batches_packs_greedily_to_the_budget():
    lengths = np.full(10, 100)
    batches = batching.plan_batches(lengths, 400)
    assert [len(b) for b in batches] == [4, 4, 2]
    check_plan(lengths, batches, 400)


def test_plan_batches_oversized_samples_stand_alone():
    lengths = np.array([5000, 10, 6000, 20, 4096, 4097])
    batches = batching.plan_batches(lengths, 4096)
    check_plan(lengths, batches, 4096)
    singles = [b.tolist() for b in batches if len(b) == 1]
    for index in (0, 2, 5):  # longer than the budget: a batch of its own
        assert [index] in singles
    assert [4] in singles  # exactly the budget: fits alone, nothing else fits with it
    assert batches[0].tolist() == [2]  # the longest goes first
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))


def test_plan_batches_exact_fit_allowed():
    # 4 x 1024 == 4096 is within the budget (<=)
    batches = batching.plan_batches(np.full(8, 1024), 4096)
    assert [len(b) for b in batches] == [4, 4]


def test_plan_batches_empty_and_single():
    assert batching.plan_batches(np.array([], dtype=np.int64), 100) == []
    batches = batching.plan_batches(np.array([7]), 100)
    assert [b.tolist() for b in batches] == [[0]]


def test_plan_batches_accepts_a_list():
    batches = batching.plan_batches([2, 9, 4], 10)
    check_plan(np.array([2, 9, 4]), batches, 10)


def test_padding_fraction_is_low_on_lognormal_lengths():
    lengths = lognormal_lengths(20000, seed=1234, cap=4096)
    batches = batching.plan_batches(lengths, 4096)
    check_plan(lengths, batches, 4096)
    fraction = batching.padding_fraction(lengths, batches)
    print(f"padding fraction (log-normal lengths, 4096-token batches): {fraction:.4f}")
    assert 0.0 <= fraction < 0.15


def test_padding_fraction_exact_values():
    lengths = np.array([4, 2, 2])
    # one batch [0,1,2]: computed 3*4 = 12, real 8 -> 1/3 padding
    assert batching.padding_fraction(lengths, [np.array([0, 1, 2])]) == pytest.approx(1 / 3)
    # equal lengths: no padding
    lengths = np.full(6, 50)
    assert batching.padding_fraction(lengths, batching.plan_batches(lengths, 200)) == 0.0
    assert batching.padding_fraction(np.array([], dtype=np.int64), []) == 0.0


def check_windows(lengths: np.ndarray, bounds: list[tuple[int, int]], window_tokens: int) -> None:
    if len(lengths) == 0:
        assert bounds == []
        return
    assert bounds[0][0] == 0
    assert bounds[-1][1] == len(lengths)
    for (_, s1), (t0, _) in zip(bounds, bounds[1:]):
        assert s1 == t0  # consecutive, no gap or overlap
    for s0, s1 in bounds:
        assert s1 > s0  # never empty
    for s0, s1 in bounds[:-1]:
        tokens = int(np.sum(lengths[s0:s1]))
        assert tokens >= window_tokens
        # and a window closes as soon as it reaches the budget
        assert int(np.sum(lengths[s0 : s1 - 1])) < window_tokens


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("window_tokens", [1, 50, 1000, 100000])
def test_windows_properties_random(seed, window_tokens):
    lengths = lognormal_lengths(300, seed, cap=5000)
    bounds = batching.windows(lengths, window_tokens)
    check_windows(lengths, bounds, window_tokens)


def test_windows_examples():
    lengths = np.array([3, 3, 3, 3, 3])
    assert batching.windows(lengths, 6) == [(0, 2), (2, 4), (4, 5)]
    assert batching.windows(lengths, 100) == [(0, 5)]
    assert batching.windows(lengths, 1) == [(i, i + 1) for i in range(5)]
    # a sample longer than the window closes its own window
    assert batching.windows(np.array([1, 50, 1]), 10) == [(0, 2), (2, 3)]
    # exactly filled final window: nothing trails
    assert batching.windows(np.array([5, 5]), 5) == [(0, 1), (1, 2)]
    assert batching.windows(np.array([], dtype=np.int64), 10) == []


def test_windows_then_batches_cover_every_sample_once():
    lengths = lognormal_lengths(2000, seed=7)
    seen = []
    for s0, s1 in batching.windows(lengths, 8 * 4096):
        for batch in batching.plan_batches(lengths[s0:s1], 4096):
            seen.extend((s0 + batch).tolist())
    assert sorted(seen) == list(range(len(lengths)))
