"""Sampled teacher rows (generation.mode sampled / topk+sampled), the sampled KD
estimators, int8 values and top-p.

Draws are checked against the teacher's softmax with seeded chi-square tests: every
uniform comes from a counter-based hash of fixed keys, so each test computes the same
numbers on every run (no flakiness), and the thresholds are p-values of 1e-4.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import yaml

from teacher_logits import LogitStore
from teacher_logits.config import meaning_settings
from teacher_logits.errors import ConfigError, TrainingInputError
from teacher_logits.generation.topk import (
    Reduction,
    choice_uniforms,
    draw_uniforms,
    merge_slices,
    reduce_rows,
)
from teacher_logits.sampling import (
    SampleSettings,
    check_sampling,
    counts_from_draws,
    row_keys,
    uniforms,
)
from teacher_logits.store.values import decode_int8, encode_int8, truncate_top_p
from teacher_logits.training import kd_loss
from teacher_logits.verify import verify

from conftest import REPO, demo_workflow

P_VALUE = 1e-4


def reduction(top_k, vocab, mode, samples=16, temperature=1.0, chunk_rows=None):
    sampling = SampleSettings(mode=mode, samples=samples, temperature=temperature)
    r = Reduction.of(top_k, vocab, 1 << 20, True, (1.0, temperature), sampling)
    if chunk_rows:
        r = Reduction(**{**r.__dict__, "chunk_rows": chunk_rows})
    return r


def teacher_rows(rows, vocab, seed=0, scale=2.0):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (rows, vocab))).float()


def chi_square_p_value(observed, expected) -> float:
    """P(chi2 >= statistic) with len - 1 degrees of freedom (the regularised upper
    incomplete gamma function)."""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(statistic / 2.0)))


def assert_draws_follow(draws: np.ndarray, probs: np.ndarray):
    """Chi-square goodness of fit of the draws (all rows share ``probs``), cells with an
    expected count below 5 pooled."""
    observed = np.bincount(draws.ravel(), minlength=len(probs)).astype(float)
    expected = probs / probs.sum() * draws.size
    assert observed[expected == 0].sum() == 0, "an id with probability 0 was drawn"
    small = (expected < 5) & (expected > 0)
    big = expected >= 5
    obs = np.append(observed[big], observed[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    p = chi_square_p_value(obs, exp)
    assert p > P_VALUE, f"draws do not follow the softmax (chi-square p = {p:.2e})"


# --- seeds and counts -----------------------------------------------------------------


def test_uniforms_depend_on_the_row_key_and_draw_only():
    keys = row_keys([5, 9], [0, 3, 7])
    assert len(set(keys.tolist())) == 7
    # The same sample and position in another shard layout or window: the same key.
    again = row_keys([9], [0, 4])
    np.testing.assert_array_equal(again, keys[3:])
    window = row_keys([9], [0, 2], position_base=[2])
    np.testing.assert_array_equal(window, keys[5:])
    u = uniforms(keys, 16)
    assert u.dtype == np.float32 and ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(uniforms(keys[3:], 16), u[3:])
    np.testing.assert_array_equal(uniforms(keys, 8), u[:, :8])
    spread = uniforms(row_keys([0], [0, 20000]), 4).ravel()
    observed = np.bincount((spread * 64).astype(int), minlength=64).astype(float)
    assert chi_square_p_value(observed, np.full(64, len(spread) / 64)) > P_VALUE


def test_counts_list_each_distinct_draw_once_in_id_order():
    ids, counts = counts_from_draws(np.array([[7, 3, 7, 7], [2, 2, 2, 2], [1, 0, 5, 9]]))
    np.testing.assert_array_equal(ids, [[3, 7, 0, 0], [2, 0, 0, 0], [0, 1, 5, 9]])
    np.testing.assert_array_equal(counts, [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]])
    ids, counts = counts_from_draws(np.array([[4, 4], [1, 2]]), valid=np.array([True, False]))
    np.testing.assert_array_equal(counts, [[2, 0], [0, 0]])
    np.testing.assert_array_equal(ids, [[4, 0], [0, 0]])


# --- draws against the softmax (chi-square) -----------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_draws_follow_the_teachers_softmax(temperature):
    vocab, rows = 12, 4000
    logits = teacher_rows(1, vocab).repeat(rows, 1)
    r = reduction(0, vocab, "sampled", temperature=temperature)
    keys = row_keys([0], [0, rows])
    out = reduce_rows(logits.clone(), None, r, "cpu", uniforms=draw_uniforms(r.samples, keys))
    assert out.ids.shape == (rows, 0)
    probs = torch.softmax(logits[0].double() / temperature, -1).numpy()
    assert_draws_follow(out.draws.numpy(), probs)
    np.testing.assert_allclose(out.tail_lse, torch.logsumexp(logits[0] / temperature, 0), rtol=1e-6)


def test_tail_draws_follow_the_softmax_renormalised_outside_the_top_k():
    vocab, rows, k = 12, 4000, 3
    logits = teacher_rows(1, vocab, seed=1).repeat(rows, 1)
    r = reduction(k, vocab, "topk+sampled")
    out = reduce_rows(
        logits.clone(), None, r, "cpu", uniforms=draw_uniforms(r.samples, row_keys([3], [0, rows]))
    )
    top = torch.topk(logits[0], k).indices.numpy()
    probs = torch.softmax(logits[0].double(), -1).numpy()
    probs[top] = 0
    assert_draws_follow(out.draws.numpy(), probs)


def test_a_tail_that_underflows_voids_the_rows_draws():
    logits = torch.full((2, 6), -200.0)
    logits[:, :2] = 50.0  # exp(-250) underflows in float32: no tail mass outside the top 2
    r = reduction(2, 6, "topk+sampled", samples=4)
    out = reduce_rows(
        logits, None, r, "cpu", uniforms=draw_uniforms(r.samples, row_keys([0], [0, 2]))
    )
    assert torch.isneginf(out.tail_lse).all()
    _, counts = counts_from_draws(out.draws.numpy(), np.isfinite(out.tail_lse.numpy()))
    assert (counts == 0).all()


@pytest.mark.parametrize("mode", ["sampled", "topk+sampled"])
def test_vocabulary_slices_merge_to_draws_from_the_whole_softmax(mode):
    """The tensor engine's ranks draw over their own slices; the merge picks slices by
    their mass (a second uniform stream): the result follows the whole softmax."""
    vocab, rows, k = 15, 4000, 3 if mode == "topk+sampled" else 0
    logits = teacher_rows(1, vocab, seed=2, scale=1.5).repeat(rows, 1)
    keys = row_keys([1], [0, rows])
    bounds = [0, 4, 10, 15]
    slices = []
    for lo, hi in zip(bounds, bounds[1:]):
        r = reduction(k, hi - lo, mode)
        part = logits[:, lo:hi].clone()
        slices.append(
            reduce_rows(part, None, r, "cpu", id_offset=lo, uniforms=draw_uniforms(r.samples, keys))
        )
    r = reduction(k, vocab, mode)
    merged = merge_slices(slices, k, True, choice_uniforms(r.samples, keys), 1.0)
    probs = torch.softmax(logits[0].double(), -1).numpy()
    if k:
        top = torch.topk(logits[0], k).indices.numpy()
        np.testing.assert_array_equal(np.sort(merged.ids[0].numpy()), np.sort(top))
        probs[top] = 0
    assert_draws_follow(merged.draws.numpy(), probs)
    whole = torch.logsumexp(torch.from_numpy(np.log(np.maximum(probs, 1e-300))), 0)
    np.testing.assert_allclose(
        merged.tail_lse - torch.logsumexp(logits[0].double(), 0), whole, atol=1e-5
    )


def test_draws_are_bit_identical_across_chunks_batch_splits_and_row_order():
    """Same logits, same keys -> same draws, however the rows are chunked or batched."""
    vocab, rows = 300, 64
    logits = teacher_rows(rows, vocab, seed=4)
    keys = row_keys([11, 12], [0, 40, rows])
    whole_r = reduction(5, vocab, "topk+sampled")
    whole = reduce_rows(
        logits.clone(), None, whole_r, "cpu", uniforms=draw_uniforms(whole_r.samples, keys)
    )
    small = reduction(5, vocab, "topk+sampled", chunk_rows=7)
    order = np.random.default_rng(0).permutation(rows)
    parts = []
    for batch in np.array_split(order, 3):
        part = reduce_rows(
            logits[batch].clone(),
            None,
            small,
            "cpu",
            uniforms=draw_uniforms(small.samples, keys[batch]),
        )
        parts.append((batch, part.draws))
    again = torch.empty_like(whole.draws)
    for batch, draws in parts:
        again[batch] = draws
    assert torch.equal(again, whole.draws)


# --- the estimators against a float64 full-vocabulary KL ---------------------------------


def full_kl(teacher, student, temperature=1.0):
    p = torch.log_softmax(teacher / temperature, -1)
    q = torch.log_softmax(student / temperature, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def sampled_batch(teacher, k, draws, mode, temperature=1.0, entropy=True):
    """A collate-shaped batch of one position per row, from float64 teacher logits and
    draws made by the generation code itself."""
    rows, vocab = teacher.shape
    r = reduction(k, vocab, mode, samples=draws, temperature=temperature)
    keys = np.arange(rows, dtype=np.uint64) * np.uint64(7919)
    out = reduce_rows(
        teacher.float().clone(), None, r, "cpu", uniforms=draw_uniforms(r.samples, keys)
    )
    ids, counts = counts_from_draws(out.draws.numpy(), np.isfinite(out.tail_lse.numpy()))
    lse = torch.logsumexp(teacher, -1)
    top = torch.topk(teacher, k)
    batch = {
        "kd_mask": torch.ones(rows, 1, dtype=torch.bool),
        "labels": torch.zeros(rows, 1, dtype=torch.long),
        "topk_ids": top.indices[:, None],
        "topk_logprobs": (top.values - lse[:, None])[:, None].float(),
        "logsumexp_t": {
            1.0: lse[:, None].float(),
            temperature: torch.logsumexp(teacher / temperature, -1)[:, None].float(),
        },
        "sampled_ids": torch.from_numpy(ids.astype(np.int64))[:, None],
        "sampled_counts": torch.from_numpy(counts.astype(np.int64))[:, None],
        "sample_temperature": temperature,
    }
    if entropy:
        logp = torch.log_softmax(teacher, -1)
        batch["entropy"] = (-(logp.exp() * logp).sum(-1))[:, None].float()
    return batch


def per_row_losses(student, batch, **kwargs):
    return torch.stack(
        [
            kd_loss(student[i : i + 1, None].double(), {**_row(batch, i)}, **kwargs)
            for i in range(student.shape[0])
        ]
    )


def _row(batch, i):
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[i : i + 1]
        elif isinstance(value, dict):
            out[key] = {t: v[i : i + 1] for t, v in value.items()}
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("mode,k", [("sampled", 0), ("topk+sampled", 4)])
def test_sampled_estimators_are_unbiased_for_the_full_kl_and_top_k_alone_is_not(mode, k):
    """The same teacher row drawn from 3000 times (16 draws each): the estimator's mean
    is within 4 standard errors of the float64 full-vocabulary KL; top-k alone (bucket)
    misses it by far more. The gradient's mean matches the full KL's gradient too."""
    vocab, rows = 16, 3000
    rng = np.random.default_rng(5)
    teacher = torch.from_numpy(rng.normal(0, 2.0, vocab)).repeat(rows, 1)
    student = torch.from_numpy(rng.normal(0, 2.0, vocab)).repeat(rows, 1)
    batch = sampled_batch(teacher, k, 16, mode)
    want = full_kl(teacher[:1], student[:1])
    logits = student[:, None].clone().requires_grad_(True)
    per_row = per_row_losses(student, batch)
    mean, se = float(per_row.mean()), float(per_row.std()) / math.sqrt(rows)
    assert abs(mean - want) < 4 * se + 2e-3, (mean, want, se)  # 2e-3: float16-free, float32 entropy
    total = kd_loss(logits, batch)
    np.testing.assert_allclose(float(total.detach()), mean, rtol=1e-9)
    total.backward()
    full_grad = torch.func.grad(lambda s: _kl_t(teacher[:1], s))(student[:1])
    got = logits.grad.sum(0)[0]  # d(mean over rows)/d(row) summed over rows = mean gradient
    assert (got - full_grad[0]).abs().max() < 0.02, (got, full_grad)
    if k:
        bucket = float(kd_loss(student[:1, None].clone(), _row(batch, 0), tail="bucket"))
        assert abs(bucket - want) > 10 * se


def _kl_t(teacher, student):
    p = torch.log_softmax(teacher, -1)
    return (p.exp() * (p - torch.log_softmax(student, -1))).sum(-1).mean()


def test_draws_outside_the_students_vocabulary_are_one_line_errors():
    teacher = teacher_rows(4, 10).double()
    batch = sampled_batch(teacher, 0, 4, "sampled")
    with pytest.raises(TrainingInputError) as error:
        kd_loss(torch.zeros(4, 1, 6), batch)  # a student with 6 ids, the teacher has 10
    assert "the teacher's draws hold token id" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_masked_slice_takes_no_draws():
    vocab, rows = 12, 500
    logits = teacher_rows(1, vocab, seed=9).repeat(rows, 1)
    logits[:, 8:] = -torch.inf  # the last slice holds no probability
    keys = row_keys([4], [0, rows])
    slices = []
    for lo, hi in ((0, 8), (8, 12)):
        r = reduction(2, hi - lo, "topk+sampled")
        part = logits[:, lo:hi].clone()
        slices.append(
            reduce_rows(part, None, r, "cpu", id_offset=lo, uniforms=draw_uniforms(r.samples, keys))
        )
    merged = merge_slices(slices, 2, True, choice_uniforms(16, keys))
    assert torch.isfinite(merged.tail_lse).all() and (merged.draws < 8).all()
    probs = torch.softmax(logits[0].double(), -1).numpy()
    probs[torch.topk(logits[0], 2).indices.numpy()] = 0
    assert_draws_follow(merged.draws.numpy(), probs)


def test_the_sampled_loss_refuses_another_temperature_in_one_line():
    teacher = teacher_rows(4, 10).double()
    batch = sampled_batch(teacher, 2, 4, "topk+sampled", temperature=2.0)
    student = torch.zeros(4, 1, 10)
    with pytest.raises(TrainingInputError) as error:
        kd_loss(student, batch, temperature=1.0)
    assert "sample_temperature=2" in str(error.value) and "\n" not in str(error.value)
    assert torch.isfinite(kd_loss(student, batch, temperature=2.0))
    assert torch.isfinite(kd_loss(student, batch, temperature=1.0, tail="bucket"))
    sampled_only = sampled_batch(teacher, 0, 4, "sampled")
    with pytest.raises(TrainingInputError, match="no top-k"):
        kd_loss(student, sampled_only, tail="bucket")


# --- top-p and int8 ------------------------------------------------------------------------


def test_top_p_keeps_ranks_until_their_mass_reaches_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]], np.float32))
    ids = np.array([[4, 2, 9, 1], [3, 0, 5, 6]], np.int32)
    lse = np.zeros(2, np.float32)
    out_ids, out_logits = truncate_top_p(ids, logits, lse, 0.75)
    np.testing.assert_array_equal(out_ids, [[4, 2, 0, 0], [3, 0, 0, 0]])
    assert np.isneginf(out_logits[0, 2:]).all() and np.isfinite(out_logits[0, :2]).all()
    assert np.isneginf(out_logits[1, 1:]).all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_kd_loss_on_top_p_rows_is_finite_and_equals_the_loss_over_the_kept_ranks(tail):
    rng = np.random.default_rng(6)
    vocab = 20
    teacher = torch.from_numpy(rng.normal(0, 3, (6, vocab)))
    lse = torch.logsumexp(teacher, -1)
    top = torch.topk(teacher, 8)
    ids, logits = truncate_top_p(top.indices.numpy(), top.values.numpy(), lse.numpy(), 0.7)
    kept = np.isfinite(logits)
    # Rank 0 is id 0 in some rows, so a stray id 0 at unused ranks would count twice.
    ids[0, 0], teacher_ids = 0, ids
    student = torch.from_numpy(rng.normal(0, 1, (6, 1, vocab))).requires_grad_(True)
    batch = {
        "kd_mask": torch.ones(6, 1, dtype=torch.bool),
        "labels": torch.zeros(6, 1, dtype=torch.long),
        "topk_ids": torch.from_numpy(teacher_ids.astype(np.int64))[:, None],
        "topk_logprobs": torch.from_numpy(logits - lse.numpy()[:, None].astype(np.float32))[
            :, None
        ],
        "logsumexp_t": {1.0: lse[:, None].float()},
    }
    loss = kd_loss(student, batch, tail=tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    for row in range(6):
        n = int(kept[row].sum())
        alone = {
            **_row(batch, row),
            "topk_ids": batch["topk_ids"][row : row + 1, :, :n],
            "topk_logprobs": batch["topk_logprobs"][row : row + 1, :, :n],
        }
        s = student.detach()[row : row + 1].clone().requires_grad_(True)
        want = kd_loss(s, alone, tail=tail)
        want.backward()
        got_s = student.detach()[row : row + 1].clone().requires_grad_(True)
        got = kd_loss(got_s, _row(batch, row), tail=tail)
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_s.grad, s.grad)


def test_int8_values_are_within_half_a_step_and_the_top_is_exact():
    rng = np.random.default_rng(7)
    values = np.sort(rng.normal(18, 3, (50, 64)).astype(np.float32), axis=1)[:, ::-1].copy()
    values[3, 40:] = -np.inf
    codes, top, step = encode_int8(values)
    assert codes.dtype == np.uint8 and top.dtype == np.float32
    back = decode_int8(codes, top, step)
    np.testing.assert_array_equal(back[:, 0], values[:, 0])
    finite = np.isfinite(values)
    assert (
        np.abs(back[finite] - values[finite]) <= (step[:, None] / 2 + 1e-5).repeat(64, 1)[finite]
    ).all()
    assert np.isneginf(back[3, 40:]).all()
    assert (step < (values[:, 0] - values[:, -1]) / 250 + 1e-6)[np.arange(50) != 3].all()


def test_top_p_with_a_sampled_mode_is_refused_at_plan_time():
    with pytest.raises(ConfigError, match="top_p: null, or mode: topk"):
        check_sampling({"generation": {"top_p": 0.9, "mode": "sampled"}})
    check_sampling({"generation": {"top_p": 0.9, "mode": "topk"}})


# --- through the workflow ------------------------------------------------------------------

SAMPLED_RUN = {
    "num_shards": 2,
    "dataset": {"max_samples": 60},
    "generation": {
        "threads": 1,
        "batch_tokens": 1024,
        "top_k": 8,
        "mode": "topk+sampled",
        "samples": 8,
        "sample_temperature": 2.0,
    },
}


def test_a_topk_plus_sampled_store_is_validated_read_and_trained_on(workflow):
    workflow.run("--cores", "2", config=SAMPLED_RUN)
    out = workflow.path("results", "demo")
    store = LogitStore(out)
    assert store.top_k == 8 and 2.0 in store.temperatures
    rec = store[0]
    counts = rec["sampled_counts"].astype(int)
    assert set(counts.sum(axis=1)) <= {0, 8} and rec["sample_temperature"] == 2.0
    for ids, c, top in zip(rec["sampled_ids"], counts, rec["topk_ids"]):
        assert not set(ids[c > 0]) & set(top)  # drawn from the tail only
    assert verify(out, deep=True, workers=1) == []
    from teacher_logits.training import collate

    batch = collate([store[i] for i in range(4)])
    student = torch.zeros(*batch["input_ids"].shape, store.vocab_size, requires_grad=True)
    loss = kd_loss(student, batch, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    store.close()

    # A count that no longer sums to `samples` is caught by verify --deep.
    shard = out / "shards" / "shard_00000.h5"
    with h5py.File(shard, "r+") as handle:
        counts = handle["sampled_counts"][:2]
        counts[1, 0] += 1
        handle["sampled_counts"][:2] = counts
    problems = verify(out, deep=True, workers=1)
    assert any("sampled_counts of row 1 sum to 9, expected 8" in p for p in problems), problems
    # A tail draw that is one of the row's top-k ids is caught too.
    with h5py.File(out / "shards" / "shard_00001.h5", "r+") as handle:
        first_top = int(np.cumsum(handle["topk_ids"][5])[0])
        drawn = handle["sampled_ids"][:8]
        drawn[5, 0] = first_top
        handle["sampled_ids"][:8] = drawn
    problems = verify(out, deep=True, workers=1)
    assert any("a tail draw of row 5 is one of its top-k ids" in p for p in problems), problems


def test_draws_survive_a_batch_split_wherever_the_logits_do(demo_dir):
    """The real demo teacher in float32, one window batched two ways. A different batch
    composition moves some rows by a few float32 ulps (test_out_of_memory.py); a row
    whose logits come out bit-identical must draw bit-identically, and a moved row can
    change a draw only if its uniform sits within that ulp-sized move of a CDF boundary
    (chance ~1e-6 per draw), so at most a handful of the ~35k draws may differ."""
    from transformers import AutoTokenizer

    from teacher_logits.generation.compute import compute_window
    from teacher_logits.generation.teacher import TopKHead, load_teacher

    torch.set_num_threads(2)
    model = load_teacher(str(demo_dir / "teacher"), dtype="float32")
    head = TopKHead(model, top_k=8, sampling=SampleSettings("topk+sampled", 16, 1.0))
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    texts = (demo_dir / "corpus.jsonl").read_text().splitlines()[:40]
    ids = [np.asarray(tokenizer(t)["input_ids"][:128], np.int32) for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    ids = np.concatenate(ids)
    keys = row_keys(np.arange(40) * 3, offsets)
    whole = compute_window(head, ids, offsets, 2048, 0, keys)
    split = compute_window(head, ids, offsets, 256, 0, keys)
    same_logits = (whole["logsumexp"] == split["logsumexp"]) & (
        whole["topk_logits"] == split["topk_logits"]
    ).all(axis=1)
    # Here ~99% of rows come out bit-identical; another BLAS may move more of them,
    # which only makes the first check cover fewer rows, and the second still holds.
    for name in ("sampled_ids", "sampled_counts"):
        np.testing.assert_array_equal(whole[name][same_logits], split[name][same_logits])
        assert (whole[name] != split[name]).any(axis=1).sum() <= 5


def test_a_sampled_store_has_no_top_k_and_its_draws_sum_to_samples(workflow):
    config = {
        **SAMPLED_RUN,
        "dataset": {"max_samples": 30},
        "generation": {**SAMPLED_RUN["generation"], "mode": "sampled"},
    }
    workflow.run("--cores", "2", config=config)
    out = workflow.path("results", "demo")
    with LogitStore(out) as store:
        assert store.top_k == 0
        rec = store[1]
        assert "topk_ids" not in rec
        assert (rec["sampled_counts"].astype(int).sum(axis=1) == 8).all()
        assert store.temperatures == [1.0, 2.0]  # the sample temperature's logsumexp
        with h5py.File(out / "shards" / "shard_00000.h5", "r", locking=False) as shard:
            assert "topk_logits" not in shard and shard.attrs["sampling_mode"] == "sampled"
    assert verify(out, deep=True, workers=1) == []
    # A top-k size or value dtype changes nothing a sampled store holds: nothing reruns.
    unstored = {**config, "storage": {"value_dtype": "float32"}}
    unstored["generation"] = {**config["generation"], "top_k": 4}
    assert "Nothing to be done" in workflow.run("-n", config=unstored).stdout
    # Without a top-k, the temperature datasets are still checked.
    with h5py.File(out / "shards" / "shard_00001.h5", "r+") as shard:
        shard["logsumexp_t2.0"][3] = np.nan
    problems = verify(out, deep=True, workers=1)
    assert any("non-finite values in logsumexp_t2.0" in p for p in problems), problems


def test_sampled_mode_fingerprints_no_top_k_setting():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["generation"]["mode"] = "sampled"
    sampled = meaning_settings(config)
    config["generation"]["top_k"], config["storage"]["value_dtype"] = 4, "int8"
    assert meaning_settings(config) == sampled
    config["generation"]["mode"] = "topk+sampled"  # stores a top-k: both count
    assert meaning_settings(config)["generation"]["top_k"] == 4
    assert meaning_settings(config)["storage"]["value_dtype"] == "int8"


def test_int8_values_and_top_p_round_trip_through_the_workflow(workflow, demo_dir):
    base = {"num_shards": 1, "dataset": {"max_samples": 30}}
    generation = {"threads": 1, "batch_tokens": 1024, "top_k": 16}
    workflow.run(
        "--cores",
        "2",
        config={**base, "generation": generation, "storage": {"value_dtype": "float32"}},
    )
    out = workflow.path("results", "demo")
    with LogitStore(out) as store:
        exact = [store[i] for i in range(len(store))]
    lossy = demo_workflow(workflow.root.parent / "lossy", demo_dir)
    lossy.run(
        "--cores",
        "2",
        config={
            **base,
            "generation": {**generation, "top_p": 0.9},
            "storage": {"value_dtype": "int8"},
        },
    )
    out = lossy.path("results", "demo")
    assert verify(out, deep=True, workers=1) == []
    with LogitStore(out) as store:
        for want, got in zip(exact, (store[i] for i in range(len(store)))):
            assert got["topk_logits"].dtype == np.float32
            kept = np.isfinite(got["topk_logits"])
            assert kept[:, 0].all() and not kept.all()  # top-p dropped some ranks, never rank 0
            np.testing.assert_array_equal(got["topk_ids"][~kept], 0)
            # Top-p keeps the n most likely ids (it runs before int8, and bfloat16 logits
            # tie often, so which of tied ids is kept may differ): each kept id has the
            # exact value within half an int8 step, and is among the n most likely.
            spread = want["topk_logits"][:, 0] - want["topk_logits"][:, -1]
            for row in range(len(kept)):
                n = int(kept[row].sum())
                exact = dict(zip(want["topk_ids"][row].tolist(), want["topk_logits"][row]))
                for token, value in zip(got["topk_ids"][row, :n], got["topk_logits"][row, :n]):
                    assert exact[int(token)] >= want["topk_logits"][row, n - 1]
                    # Half a step of (top - lowest kept) / 254, below all 16 ranks' spread.
                    assert abs(value - exact[int(token)]) <= spread[row] / 508 + 1e-4
            np.testing.assert_array_equal(got["topk_logits"][:, 0], want["topk_logits"][:, 0])


@pytest.mark.slow
def test_a_killed_sampled_run_resumes_to_bit_identical_draws(workflow, demo_dir, tmp_path):
    from test_resume import RESUME, assert_same_store, committed_parts, kill_when, store_datasets

    config = {**RESUME, "generation": {**RESUME["generation"], "mode": "topk+sampled"}}
    reference = demo_workflow(tmp_path / "reference", demo_dir)
    reference.run("--cores", "1", config=config)
    expected = store_datasets(reference.root)
    assert "shard_00000.h5:sampled_ids" in expected
    proc = workflow.start("--cores", "1", config=config)
    kill_when(proc, lambda: len(committed_parts(workflow)) >= 2, "two parts committed")
    workflow.run("--cores", "1", config=config)
    log = workflow.path("results", "demo", "logs", "generate", "shard_00000.log").read_text()
    assert "resuming shard_00000.parts" in log
    assert_same_store(store_datasets(workflow.root), expected)


def test_the_disk_estimate_counts_draws_and_int8_scales():
    from teacher_logits.row_bytes import planned_row, uncompressed_bytes_per_token

    settings = {"generation": {"mode": "topk+sampled", "samples": 16, "sample_temperature": 2.0}}
    row = planned_row({"settings": settings})
    assert row == {"temperatures": (1.0, 2.0), "samples": 16, "cross_fields": False}
    # input id 4, 8 x (id 4 + code 1), int8 max and step 8, logsumexp 4, entropy 2,
    # logsumexp at 2.0: 4, 16 draws x (id 4 + count 1).
    assert uncompressed_bytes_per_token(8, "int8", True, **row) == 4 + 40 + 8 + 4 + 2 + 4 + 80
    sampled = planned_row({"settings": {"generation": {"mode": "sampled", "samples": 8}}})
    assert uncompressed_bytes_per_token(0, "float16", False, **sampled) == 4 + 4 + 40


def test_a_sampled_run_from_before_the_stand_ins_keeps_its_fingerprint_and_plan():
    """Sampled runs once fingerprinted their top_k and value dtype: upgrading must neither
    call that a change nor regenerate their shards."""
    from teacher_logits.fingerprints import config_fingerprint, run_config_fingerprint
    from teacher_logits.run_inputs import changes_since

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["generation"]["mode"] = "sampled"
    config["generation"]["top_k"], config["storage"]["value_dtype"] = 32, "float32"
    now = meaning_settings(config)
    before = {  # what the previous version recorded for the same run
        **now,
        "generation": {**now["generation"], "top_k": 32},
        "storage": {**now["storage"], "value_dtype": "float32"},
    }
    earlier = {"config_fingerprint": config_fingerprint(before, "t", "k"), "settings": before}
    assert run_config_fingerprint(now, "t", "k", earlier) == earlier["config_fingerprint"]
    assert changes_since({"settings": before}, {"settings": now}) == []
    # Another setting that does change the numbers still does.
    other = {**now, "generation": {**now["generation"], "samples": 4}}
    assert run_config_fingerprint(other, "t", "k", earlier) != earlier["config_fingerprint"]
    assert changes_since({"settings": before}, {"settings": other}) == [
        "generation.samples 16 -> 4"
    ]
