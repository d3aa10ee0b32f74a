"""Distillation losses for a student with its own tokenizer, on a ``collate_cross_tokenizer`` batch.

    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = cross_tokenizer_loss(out.logits, batch, loss="both", ce_weight=0.5)

Chunk loss (approximate likelihood matching, ALM: Minixhofer et al. 2025): per chunk, the
teacher's log-likelihood of its bytes (the sum of ``target_logprob`` over the rows that
predict its tokens) and the student's (the same over its own tokens) become chunk
probabilities ``p = exp(L_T / T)``, ``q = exp(L_S / T)``; the loss is the mean over chunks
of the binary KL ``p log(p/q) + (1-p) log((1-p)/(1-q))``.

Distribution loss, at each pair of rows where both sides predict a next token starting at
the same byte: the teacher's top-k ids that have a student token with the same bytes are
outcomes on both sides; everything else (the teacher's unmatched and untold mass, the
student's other tokens) is one rest outcome, as ``kd_loss``'s ``tail="bucket"``; the loss
is the mean over pairs of KL(teacher || student) at temperature T.
"""

from __future__ import annotations

import math
import numbers

import torch

from ...errors import TrainingInputError
from ..collation import IGNORE_INDEX
from ..losses import logsumexp_at

LOSSES = ("both", "chunk", "distribution")
# Chunk probabilities are kept below 1 - 1e-6: log(1 - q) stays finite, and a chunk the
# student is already that sure of gives no gradient.
_MAX_LOG_P = -1e-6
_LN2 = math.log(2.0)


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    batch: dict,
    loss: str = "both",
    ce_weight: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(1 - ce_weight) * kd + ce_weight * ce``: kd the chunk loss, the distribution loss or
    (``"both"``) their sum; ce the student's mean cross-entropy on ``labels``. A term with
    no chunk, pair or label in the batch is 0 (with zero gradient).

    ``student_logits``: [B, L, V] for the batch's ``input_ids``, unshifted. The rows used
    are copied once in float32 (float64 for float64 logits)."""
    if loss not in LOSSES:
        raise TrainingInputError(
            f"cross_tokenizer_loss: loss={loss!r}; use one of {', '.join(LOSSES)}"
        )
    if not _is_number(ce_weight) or not 0.0 <= float(ce_weight) <= 1.0:
        raise TrainingInputError(
            f"cross_tokenizer_loss: ce_weight={ce_weight!r}; use a number in [0, 1]"
        )
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise TrainingInputError(
            f"cross_tokenizer_loss: temperature={temperature!r}; use a number > 0"
        )
    _check_logits(student_logits, batch)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    token_logp, labelled, chunk_of = _next_token_logprobs(student_logits, batch, dtype)
    zero = student_logits.sum() * 0
    ce = -token_logp[labelled].mean() if labelled.any() else zero
    if float(ce_weight) == 1.0:
        return ce.to(dtype)
    kd = zero
    if loss in ("both", "chunk"):
        kd = kd + _chunk_loss(token_logp, chunk_of, batch, float(temperature), dtype)
    if loss in ("both", "distribution"):
        kd = kd + _distribution_loss(student_logits, batch, float(temperature), dtype)
    return ((1.0 - ce_weight) * kd + ce_weight * ce).to(dtype)


def _check_logits(student_logits, batch: dict) -> None:
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise TrainingInputError(
            "cross_tokenizer_loss: student_logits must be a floating-point torch tensor"
        )
    shape = tuple(batch["input_ids"].shape)
    if student_logits.dim() != 3 or tuple(student_logits.shape[:2]) != shape:
        raise TrainingInputError(
            f"cross_tokenizer_loss: student_logits has shape {tuple(student_logits.shape)} but "
            f"the batch holds {shape} student tokens; pass the logits of every position "
            "[B, L, V], unshifted"
        )
    mapped = batch["teacher_topk_student_ids"]
    vocab = student_logits.shape[-1]
    if mapped.numel() and int(mapped.max()) >= vocab:
        raise TrainingInputError(
            f"cross_tokenizer_loss: the vocabulary map names student id {int(mapped.max())} but "
            f"the logits cover {vocab} ids; build the map with this student's tokenizer"
        )


def _next_token_logprobs(student_logits, batch: dict, dtype):
    """log q(input_ids[t+1] | <= t) at every row a term needs, as a flat vector, with which
    of them carry a label and the chunk each predicts."""
    labels = batch["labels"].to(student_logits.device)
    row_chunk = batch["student_row_chunk"].to(student_logits.device)
    needed = (labels != IGNORE_INDEX) | (row_chunk >= 0)
    b, t = needed.nonzero(as_tuple=True)
    next_ids = batch["input_ids"].to(student_logits.device)[b, t + 1]
    rows = student_logits[b, t].to(dtype)
    token_logp = rows.gather(1, next_ids[:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
    return token_logp, labels[b, t] != IGNORE_INDEX, row_chunk[b, t]


def _chunk_loss(token_logp, chunk_of, batch: dict, temperature: float, dtype) -> torch.Tensor:
    chunks = len(batch["chunk_bytes"])
    if not chunks:
        return token_logp.sum() * 0
    device = token_logp.device
    in_chunk = chunk_of >= 0
    student = torch.zeros(chunks, dtype=dtype, device=device).index_add(
        0, chunk_of[in_chunk], token_logp[in_chunk]
    )
    teacher_rows = batch["teacher_row_chunk"] >= 0
    teacher = torch.zeros(chunks, dtype=torch.float64).index_add(
        0,
        batch["teacher_row_chunk"][teacher_rows],
        batch["teacher_target_logprob"][teacher_rows].to(torch.float64),
    )
    log_p = (teacher / temperature).clamp(max=_MAX_LOG_P).to(device=device, dtype=dtype)
    log_q = (student / temperature).clamp(max=_MAX_LOG_P)
    p = log_p.exp()
    kl = p * (log_p - log_q) + (1 - p) * (_log1mexp(log_p) - _log1mexp(log_q))
    return kl.mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, each branch where it is accurate (and finite elsewhere,
    so the unused one passes no NaN gradient)."""
    near = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near, far)


def _distribution_loss(student_logits, batch: dict, temperature: float, dtype) -> torch.Tensor:
    pairs = batch["pair_index"]
    if not len(pairs):
        return student_logits.sum() * 0
    if batch["teacher_topk_ids"].shape[-1] == 0:
        raise TrainingInputError(
            "cross_tokenizer_loss: the store has no top-k (written in `sampled` mode), which "
            "the distribution loss needs; use loss='chunk'"
        )
    device = student_logits.device
    b, t, s = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    log_p = batch["teacher_topk_logprobs"][b, t].to(torch.float64)
    if temperature != 1.0:
        lse_1 = _logsumexp_at(batch, 1.0)[b, t].to(torch.float64)
        lse_t = _logsumexp_at(batch, temperature)[b, t].to(torch.float64)
        log_p = (log_p + lse_1[:, None]) / temperature - lse_t[:, None]
    ids = batch["teacher_topk_student_ids"][b, t].to(device)
    matched = ids >= 0
    log_p = torch.where(matched, log_p.to(device=device, dtype=dtype), 0.0)
    p = torch.where(matched, log_p.exp(), 0.0)
    rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)

    rows = student_logits[b.to(device), s.to(device)].to(dtype) / temperature
    lse = torch.logsumexp(rows, dim=-1)
    safe_ids = ids.clamp_min(0)
    log_q = rows.gather(1, safe_ids) - lse[:, None]
    taken = torch.zeros(rows.shape, dtype=torch.int32, device=device)
    taken = taken.scatter_add(1, safe_ids, matched.to(torch.int32)) > 0
    log_rest_q = torch.logsumexp(rows.masked_fill(taken, -math.inf), dim=-1) - lse
    head = torch.where(matched, p * (log_p - log_q), 0.0).sum(-1)
    rest = torch.where(rest_p > 0, rest_p * (torch.log(rest_p.clamp_min(1e-30)) - log_rest_q), 0.0)
    return (head + rest).mean()


def _logsumexp_at(batch: dict, temperature: float) -> torch.Tensor:
    return logsumexp_at(
        batch.get("teacher_logsumexp_t") or {},
        temperature,
        f"cross_tokenizer_loss(temperature={temperature:g})",
        "or train at a stored temperature",
    )


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
