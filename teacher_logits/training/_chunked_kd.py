"""The distillation loss as an autograd Function that never holds a full-size float copy.

A student's logits over a 128k vocabulary are the largest tensor of a training
step. Letting autograd differentiate a plain softmax would keep every row's
float32 softmax alive until backward: several copies the size of the logits.
Here forward works through the selected rows a chunk at a time and keeps only
per-row numbers; backward recomputes each chunk (one more pass over the rows,
small next to the student's own forward and backward) and writes the analytic
gradient straight into the one gradient tensor autograd must return anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

# A chunk's float copy of its logits is kept under this; the loss holds a few such
# buffers at once (the copy, softmax temporaries), never one the size of the logits.
CHUNK_BYTES = 64 * 2**20


@dataclass
class DistillationRows:
    """The rows a loss reads, gathered from the batch onto the student's device.

    ``teacher_log_p``: log-probabilities of the top-k ids at the temperature (bucket:
    over the full vocabulary; renormalize: over the k ids; -inf at ranks top-p left
    unused, whose ids point at rank 0's). ``teacher_rest``: the bucket's teacher mass
    outside the top-k, clamped at 0. ``sampled``: ``topk_ids`` are the head's ids then
    the drawn ids, ``target_weight`` the teacher mass each stands for, and the loss is
    ``teacher_offset - sum(target_weight * log q)``.
    """

    batch_index: torch.Tensor  # int64 [M]
    position_index: torch.Tensor  # int64 [M]
    topk_ids: torch.Tensor  # int64 [M, k]
    teacher_log_p: torch.Tensor  # [M, k], compute dtype
    teacher_rest: torch.Tensor | None  # [M] (bucket only)
    labels: torch.Tensor | None  # int64 [M] (when ce_weight > 0)
    temperature: float
    tail: str
    kd_weight: float
    ce_weight: float
    chunk_rows: int
    compute_dtype: torch.dtype
    target_weight: torch.Tensor | None = None  # [M, n] (sampled only)
    teacher_offset: torch.Tensor | None = None  # [M] (sampled only)

    def __len__(self) -> int:
        return len(self.batch_index)

    def chunks(self):
        for start in range(0, len(self), self.chunk_rows):
            yield slice(start, start + self.chunk_rows)


def default_chunk_rows(vocab_size: int, compute_dtype: torch.dtype) -> int:
    itemsize = torch.finfo(compute_dtype).bits // 8
    return max(1, CHUNK_BYTES // (vocab_size * itemsize))


class ChunkedDistillationLoss(torch.autograd.Function):
    """``(kd_weight * sum KL + ce_weight * sum CE) / M`` over the rows, chunk by chunk."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, rows: DistillationRows) -> torch.Tensor:
        ctx.save_for_backward(student_logits)  # a reference, not a copy
        ctx.rows = rows
        total = torch.zeros((), dtype=rows.compute_dtype, device=student_logits.device)
        for part in rows.chunks():
            total += _chunk(student_logits, rows, part, gradient_scale=None)[0]
        # No row to learn from: a true zero (not 0/0) whose gradient is zero.
        return total / max(len(rows), 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (student_logits,) = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.zeros_like(student_logits)
        scale = grad_output.to(rows.compute_dtype) / max(len(rows), 1)
        for part in rows.chunks():
            _, dense, sparse = _chunk(student_logits, rows, part, gradient_scale=scale)
            b, t = rows.batch_index[part], rows.position_index[part]
            if dense is not None:
                grad[b, t] = dense.to(grad.dtype)
            elif sparse is not None:
                ids = rows.topk_ids[part]
                # Accumulated: a top-p row repeats its rank-0 id at unused ranks (gradient 0).
                grad.index_put_(
                    (b[:, None], t[:, None], ids), sparse.to(grad.dtype), accumulate=True
                )
        return grad, None


def _chunk(student_logits, rows: DistillationRows, part: slice, gradient_scale):
    """Loss sum of the rows in ``part`` and, with ``gradient_scale``, their gradient:
    ``dense`` [c, V] or, for renormalize alone, ``sparse`` [c, k] on the top-k ids."""
    b, t = rows.batch_index[part], rows.position_index[part]
    ids, log_p = rows.topk_ids[part], rows.teacher_log_p[part]
    want_grad = gradient_scale is not None
    temperature, dtype = rows.temperature, rows.compute_dtype
    loss = torch.zeros((), dtype=dtype, device=student_logits.device)
    dense = sparse = None
    if rows.kd_weight > 0:
        if rows.tail == "bucket":
            # Indexing with tensors copies just these rows; the float copy is then ours
            # to overwrite in place.
            scaled = student_logits[b, t].to(dtype).div_(temperature)
            kl, dense = _bucket_kl(scaled, ids, log_p, rows.teacher_rest[part], want_grad)
        elif rows.tail == "sampled":
            scaled = student_logits[b, t].to(dtype).div_(temperature)
            weight, offset = rows.target_weight[part], rows.teacher_offset[part]
            kl, dense = _sampled_kl(scaled, ids, weight, offset, want_grad)
        else:
            scaled = student_logits[b[:, None], t[:, None], ids].to(dtype).div_(temperature)
            kl, sparse = _renormalized_kl(scaled, log_p, want_grad)
        loss = loss + rows.kd_weight * kl.sum()
        if want_grad:
            kd_scale = gradient_scale * (rows.kd_weight / temperature)
            dense = dense.mul_(kd_scale) if dense is not None else None
            sparse = sparse.mul_(kd_scale) if sparse is not None else None
    if rows.ce_weight > 0:
        ce, ce_grad = _cross_entropy(student_logits[b, t].to(dtype), rows.labels[part], want_grad)
        loss = loss + rows.ce_weight * ce.sum()
        if want_grad:
            ce_grad.mul_(gradient_scale * rows.ce_weight)
            if dense is not None:
                ce_grad.add_(dense)
            elif sparse is not None:
                ce_grad.scatter_add_(1, ids, sparse)
            dense, sparse = ce_grad, None
    return loss, dense, sparse


def _bucket_kl(scaled, ids, log_p, teacher_rest, want_grad):
    """KL over the k ids plus one "rest" outcome; ``scaled`` (logits / T) is consumed.

    The student's rest mass comes from a logsumexp with the top-k ids masked out, so
    it stays exact when it is tiny (``1 - sum`` would cancel to 0 or below).
    Gradient w.r.t. ``scaled``: ``mass * q_j - p_j`` on the ids and
    ``mass * q_j - p_rest * q_j / q_rest`` off them, ``mass`` being the teacher's
    total (1 unless its top-k sum rounded above 1).
    """
    log_norm = torch.logsumexp(scaled, dim=-1)
    log_q = scaled.gather(1, ids) - log_norm[:, None]
    scaled.scatter_(1, ids, float("-inf"))
    log_norm_rest = torch.logsumexp(scaled, dim=-1)
    # k == V (or a student with no finite logit outside the top-k): the rest outcome
    # is empty on both sides, and its term is 0 rather than 0 * log 0.
    rest_empty = torch.isneginf(log_norm_rest)
    p_rest = torch.where(rest_empty, torch.zeros_like(teacher_rest), teacher_rest)
    log_q_rest = log_norm_rest - log_norm
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.log() - log_q_rest), 0.0)
    if not want_grad:
        return kl, None
    mass = p.sum(-1) + p_rest
    # Off the ids: q_j / q_rest = exp(scaled_j - log_norm_rest) <= 1, so nothing
    # overflows however small the student's rest mass is.
    rest_factor = mass * log_q_rest.exp() - p_rest
    shift = torch.where(rest_empty, torch.zeros_like(log_norm_rest), log_norm_rest)
    grad = scaled.sub_(shift[:, None]).exp_().mul_(rest_factor[:, None])
    # Two steps, so an id repeated at ranks top-p left unused (p = 0) writes one value.
    grad.scatter_(1, ids, mass[:, None] * log_q.exp())
    grad.scatter_add_(1, ids, -p)
    return kl, grad


def _sampled_kl(scaled, ids, weight, offset, want_grad):
    """``offset - sum_j weight_j log q(ids_j)``: the sampled estimators (see ``kd_loss``).

    Gradient w.r.t. ``scaled``: ``W q - sum_j weight_j e_{ids_j}``, W the row's total
    weight; ``scaled`` is consumed.
    """
    log_norm = torch.logsumexp(scaled, dim=-1)
    log_q = scaled.gather(1, ids) - log_norm[:, None]
    kl = offset - (weight * log_q).sum(-1)
    if not want_grad:
        return kl, None
    grad = scaled.sub_(log_norm[:, None]).exp_().mul_(weight.sum(-1, keepdim=True))
    grad.scatter_add_(1, ids, -weight)
    return kl, grad


def _renormalized_kl(scaled_ids, log_p, want_grad):
    """KL between the two distributions renormalised over the k ids (logits / T given);
    ranks top-p left unused (log_p -inf) are outside both."""
    scaled_ids = scaled_ids.masked_fill(torch.isneginf(log_p), -torch.inf)
    log_q = torch.log_softmax(scaled_ids, dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    if not want_grad:
        return kl, None
    return kl, log_q.exp() * p.sum(-1, keepdim=True) - p


def _cross_entropy(logits, labels, want_grad):
    """Cross-entropy at temperature 1; ``logits`` (a float copy) is consumed."""
    log_norm = torch.logsumexp(logits, dim=-1)
    ce = log_norm - logits.gather(1, labels[:, None]).squeeze(1)
    if not want_grad:
        return ce, None
    grad = logits.sub_(log_norm[:, None]).exp_()
    grad.scatter_add_(1, labels[:, None], torch.full_like(log_norm[:, None], -1.0))
    return ce, grad
