"""kd_loss against an independent float64 reference written out plainly here: full-
vocabulary softmaxes of the teacher's and the student's logits, the bucket and the
renormalised distributions built explicitly, and autograd for the gradient.

Tolerances: float32 logits are compared at rtol 1e-5 (loss) and 1e-5 of the largest
gradient entry (the loss works in float32; the teacher's stored values are float32).
bfloat16 logits get the same loss tolerance (the loss upcasts them exactly) but
1/128 relative on the gradient, which comes back in bfloat16 (8 significant bits).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from teacher_logits.errors import TrainingInputError
from teacher_logits.training.collation import collate
from teacher_logits.training.losses import kd_loss

from conftest import REPO

VOCAB, TOP_K = 48, 6
TEMPERATURES = (1.0, 0.5, 2.0)


def make_records(seed=0, lengths=(7, 4, 9), top_k=TOP_K, vocab=VOCAB, chat_row=1):
    """Records as the reader returns them, plus each sample's full teacher logits."""
    rng = np.random.default_rng(seed)
    records, teachers = [], []
    for sid, n in enumerate(lengths):
        full = rng.normal(0.0, 2.5, (n, vocab))
        ids = np.argsort(-full, axis=1)[:, :top_k]
        lse = {t: np.log(np.exp(full / t).sum(1)).astype(np.float32) for t in TEMPERATURES}
        record = {
            "sample_id": sid,
            "input_ids": rng.integers(0, vocab, n).astype(np.int32),
            "topk_ids": ids.astype(np.int32),
            "topk_logits": np.take_along_axis(full, ids, 1).astype(np.float32),
            "logsumexp": lse[1.0],
            "logsumexp_t": lse,
        }
        if sid == chat_row:
            record["loss_mask"] = (np.arange(n) % 3 != 1).astype(np.uint8)
        records.append(record)
        teachers.append(torch.tensor(full, dtype=torch.float64))
    return records, teachers


def reference_loss(student, records, teachers, temperature, tail, ce_weight):
    """The definition, row by row, in float64 over the whole vocabulary."""
    kl_terms, ce_terms = [], []
    for row, (record, teacher) in enumerate(zip(records, teachers)):
        n = len(record["input_ids"])
        for t in range(n - 1):
            if "loss_mask" in record and record["loss_mask"][t + 1] == 0:
                continue
            p = torch.softmax(teacher[t] / temperature, 0)
            q = torch.softmax(student[row, t] / temperature, 0)
            ids = torch.as_tensor(record["topk_ids"][t]).long()
            if tail == "bucket":
                big_p = torch.cat([p[ids], (1 - p[ids].sum()).clamp_min(0)[None]])
                big_q = torch.cat([q[ids], (1 - q[ids].sum())[None]])
            else:
                big_p, big_q = p[ids] / p[ids].sum(), q[ids] / q[ids].sum()
            kl_terms.append((big_p * (big_p.log() - big_q.log())).sum())
            target = int(record["input_ids"][t + 1])
            ce_terms.append(-torch.log_softmax(student[row, t], 0)[target])
    kd, ce = torch.stack(kl_terms).mean(), torch.stack(ce_terms).mean()
    return (1 - ce_weight) * kd + ce_weight * ce


def student_logits(batch, seed=1, dtype=torch.float32, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch["input_ids"].shape, vocab)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)


def ours(logits, batch, *args, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    loss = kd_loss(logits, batch, *args, **kwargs)
    loss.backward()
    return loss.detach(), logits.grad


def reference(logits, records, teachers, *args):
    exact = logits.detach().to(torch.float64).requires_grad_()
    loss = reference_loss(exact, records, teachers, *args)
    loss.backward()
    return loss.detach(), exact.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_value_and_gradient_match_the_float64_reference(tail, temperature, ce_weight, dtype):
    records, teachers = make_records()
    batch = collate(records, pad_to_multiple_of=4)
    logits = student_logits(batch, dtype=dtype)
    loss, grad = ours(logits, batch, temperature, tail, ce_weight)
    expected, expected_grad = reference(logits, records, teachers, temperature, tail, ce_weight)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    scale = float(expected_grad.abs().max())
    rtol = 1e-5 if dtype == torch.float32 else 1 / 128
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=1e-5 * scale)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_the_whole_vocabulary_stored_it_is_the_exact_full_kl(tail, temperature):
    records, teachers = make_records(top_k=VOCAB, vocab=VOCAB)
    batch = collate(records)
    logits = student_logits(batch, dtype=torch.float64)
    loss, grad = ours(logits, batch, temperature, tail)
    exact = logits.clone().requires_grad_()
    terms = []
    for row, teacher in enumerate(teachers):
        for t in np.flatnonzero(batch["kd_mask"][row].numpy()):
            log_p = torch.log_softmax(teacher[t] / temperature, 0)
            log_q = torch.log_softmax(exact[row, t] / temperature, 0)
            terms.append((log_p.exp() * (log_p - log_q)).sum())
    full_kl = torch.stack(terms).mean()
    full_kl.backward()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, full_kl.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, exact.grad, rtol=1e-6, atol=1e-9)


def test_packed_and_padded_batches_give_the_same_loss():
    records, _ = make_records()
    padded, packed = collate(records), collate(records, pack=True)
    logits = student_logits(padded, dtype=torch.float64)
    rows = [logits[i, : len(r["input_ids"])] for i, r in enumerate(records)]
    packed_logits = torch.cat(rows)[None]
    for tail in ("bucket", "renormalize"):
        loss, grad = ours(logits, padded, 2.0, tail, 0.5)
        packed_loss, packed_grad = ours(packed_logits, packed, 2.0, tail, 0.5)
        torch.testing.assert_close(loss, packed_loss, rtol=1e-12, atol=0)
        unpacked = torch.cat([grad[i, : len(r["input_ids"])] for i, r in enumerate(records)])
        torch.testing.assert_close(unpacked, packed_grad[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_rows_outside_kd_mask_are_never_read_and_get_zero_gradient(tail):
    records, _ = make_records()
    batch = collate(records, pad_to_multiple_of=8)
    logits = student_logits(batch)
    loss, grad = ours(logits, batch, 2.0, tail, 0.5)
    outside = ~batch["kd_mask"]
    assert outside.any()
    assert (grad[outside] == 0).all() and (grad[batch["kd_mask"]] != 0).any()
    changed = logits.clone()
    changed[outside] = torch.randn(int(outside.sum()), VOCAB) * 100
    changed[0, -1] = float("nan")  # padding may hold anything at all
    changed_loss, changed_grad = ours(changed, batch, 2.0, tail, 0.5)
    assert torch.equal(loss, changed_loss) and torch.equal(grad, changed_grad)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_chunk_rows_does_not_change_the_result(tail, ce_weight):
    records, _ = make_records(lengths=(13, 5, 11, 2))
    batch = collate(records)
    logits = student_logits(batch)
    loss, grad = ours(logits, batch, 2.0, tail, ce_weight)
    for chunk_rows in (1, 3, 1000):
        chunked_loss, chunked_grad = ours(
            logits, batch, 2.0, tail, ce_weight, chunk_rows=chunk_rows
        )
        torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(chunked_grad, grad, rtol=1e-6, atol=1e-9)


def test_a_batch_without_kd_rows_is_a_zero_loss_with_zero_gradient():
    records, _ = make_records(lengths=(1, 1))
    batch = collate(records)
    assert not batch["kd_mask"].any()
    logits = student_logits(batch)
    logits[0, 0, 0] = float("nan")
    for tail in ("bucket", "renormalize"):
        loss, grad = ours(logits, batch, 1.0, tail, 0.5)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_the_gradient_scales_with_the_upstream_gradient_and_survives_retain_graph():
    records, _ = make_records()
    batch = collate(records)
    logits = student_logits(batch).requires_grad_()
    loss = kd_loss(logits, batch, 2.0)
    (once,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (again,) = torch.autograd.grad(3.0 * loss, logits)
    torch.testing.assert_close(again, 3.0 * once)


def one_line_error(*args, **kwargs) -> str:
    """The message of the TrainingInputError that kd_loss(*args, **kwargs) raises."""
    with pytest.raises(TrainingInputError) as caught:
        kd_loss(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_temperature_the_batch_lacks_names_the_stored_ones_and_the_fix():
    records, _ = make_records()
    batch = collate(records)
    logits = student_logits(batch)
    message = one_line_error(logits, batch, temperature=3.0)
    assert "0.5, 1, 2" in message and "generation.temperatures" in message
    assert "rerun" in message
    # Renormalising over the top-k cancels the logsumexp: any temperature works.
    assert torch.isfinite(kd_loss(logits, batch, temperature=3.0, tail="renormalize"))
    del batch["logsumexp_t"][2.0]
    assert "0.5, 1 only" in one_line_error(logits, batch, temperature=2.0)


def test_bad_arguments_are_one_line_errors():
    records, _ = make_records()
    batch = collate(records)
    logits = student_logits(batch)
    message = one_line_error(logits[..., : VOCAB - 10], batch)
    assert "student's vocabulary has 38 entries" in message
    assert "tail='topk'" in one_line_error(logits, batch, tail="topk")
    for weight in (-0.1, 1.5, "half"):
        assert "ce_weight" in one_line_error(logits, batch, ce_weight=weight)
    for temperature in (0.0, -1.0, float("nan")):
        assert "temperature" in one_line_error(logits, batch, temperature)
    assert "chunk_rows" in one_line_error(logits, batch, chunk_rows=0)
    assert "unshifted" in one_line_error(logits[:, :-1], batch)
    assert "floating-point" in one_line_error(logits.long(), batch)


MEMORY_PROBE = """
import torch
from teacher_logits.training.losses import kd_loss

vocab, rows, top_k, chunk_rows = 128256, 128, 64, 4
torch.manual_seed(0)
logits = torch.empty(1, rows, vocab, dtype=torch.bfloat16)
for start in range(0, rows, 16):  # no large temporary before the baseline
    logits[0, start : start + 16] = torch.randn(16, vocab)
ids = torch.randint(0, vocab, (1, rows, top_k))
batch = {
    "kd_mask": torch.ones(1, rows, dtype=torch.bool),
    "topk_ids": ids,
    "topk_logprobs": torch.full((1, rows, top_k), -6.0),
    "labels": ids[..., 0],
    "logsumexp_t": {1.0: torch.zeros(1, rows), 2.0: torch.zeros(1, rows)},
}
small = {k: v[:, :2] if torch.is_tensor(v) else {t: x[:, :2] for t, x in v.items()}
         for k, v in batch.items()}
kd_loss(logits[:, :2].clone().requires_grad_(), small, 2.0, ce_weight=0.5).backward()
logits.requires_grad_()


def status_bytes(field):  # this process's own memory (ru_maxrss may carry the parent's)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


try:  # start the high-water mark from here (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
except OSError:
    pass
# From the resident size now: the increase measured can only be overstated, never hidden.
resident = status_bytes("VmRSS")
kd_loss(logits, batch, 2.0, ce_weight=0.5, chunk_rows=chunk_rows).backward()
peak = status_bytes("VmHWM")
print(peak - resident, logits.numel() * 2, chunk_rows * vocab * 4, logits.numel() * 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_forward_and_backward_at_a_128k_vocabulary_add_only_the_gradient_and_a_few_chunks():
    """Peak RSS of a fresh process: the bfloat16 gradient autograd needs anyway plus a
    few chunk-sized float32 buffers. A float32 copy of all the logits (what autograd
    through a plain softmax would keep) is larger than the whole allowance. A fixed
    mmap threshold makes glibc map every large buffer and unmap it when freed, so the
    resident size follows the live allocations (no freed heap to hide one in)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_PROBE)],
        cwd=REPO,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    increase, gradient, chunk, full_float32 = map(int, result.stdout.split())
    allowance = 8 * chunk + 16 * 2**20
    assert allowance < full_float32
    assert increase <= gradient + allowance, (increase, gradient, allowance)


def test_a_larger_student_vocabulary_is_fine_and_a_smaller_one_is_refused_up_front():
    """check_tokenizer's rule: the student's logits may go past the teacher's vocabulary
    (those ids are never targets); fewer is refused even when no stored id falls outside."""
    records, _ = make_records()
    batch = collate(records)
    logits = student_logits(batch)
    larger = torch.cat([logits, torch.full((*logits.shape[:2], 5), -30.0)], dim=-1)
    same = kd_loss(logits, batch, ce_weight=0.5, teacher_vocab_size=VOCAB)
    wider = kd_loss(larger, batch, ce_weight=0.5, teacher_vocab_size=VOCAB)
    assert torch.allclose(same, wider, rtol=1e-5)
    # A teacher vocabulary of VOCAB + 3 whose last ids no stored row happens to hold.
    assert torch.isfinite(kd_loss(logits, batch))
    message = one_line_error(logits, batch, teacher_vocab_size=VOCAB + 3)
    assert f"cover {VOCAB} token ids but the teacher's vocabulary has {VOCAB + 3}" in message
    assert "teacher_logits.training.cross_tokenizer" in message
