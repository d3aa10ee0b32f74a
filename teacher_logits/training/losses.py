"""Distillation loss against the stored teacher rows of a ``collate`` batch.

    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = kd_loss(out.logits, batch, temperature=2.0, tail="bucket", ce_weight=0.1)

The student's logits at position t are compared with the teacher's row t as they
are (``collate`` already aligned them; see its module docstring).
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import TrainingInputError
from ._chunked_kd import ChunkedDistillationLoss, DistillationRows, default_chunk_rows

TAILS = ("auto", "bucket", "renormalize", "sampled")
# check_tokenizer's rule: every id the store can hold must exist for the student.
SMALLER_VOCAB = (
    "use a student whose vocabulary holds the teacher's (a larger one is fine); "
    "a student with another tokenizer distils through teacher_logits.training.cross_tokenizer"
)


def kd_loss(
    student_logits: torch.Tensor,
    batch: dict,
    temperature: float = 1.0,
    tail: str = "auto",
    ce_weight: float = 0.0,
    *,
    chunk_rows: int | None = None,
    teacher_vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean over ``kd_mask`` rows of KL(teacher || student) at ``temperature`` T.

    Not multiplied by T**2 (scale it yourself if you want the classic Hinton factor).
    Teacher top-k probabilities at T are ``exp(logits / T - logsumexp_t[T])``, the
    student's ``softmax(student_logits / T)``.

    ``tail="bucket"``: outcomes are the k stored ids plus one "rest" outcome holding
    the teacher's mass outside its top-k and the student's mass outside those ids.
    Needs the teacher's logsumexp at T (``generation.temperatures``).
    ``tail="renormalize"``: both distributions renormalised over the k ids; it needs
    no stored logsumexp, so any temperature works.
    ``tail="sampled"`` (stores written in a sampled mode; ``"auto"``, the default,
    picks it when the batch has draws, else ``"bucket"``): an unbiased estimate of the
    KL from the teacher's draws, at ``temperature == sample_temperature`` only. With
    draws x_1..x_S from the teacher (``sampled`` mode) it is
    ``-H - (1/S) sum_j log q(x_j)``; with the top-k head and draws from the tail outside
    it (``topk+sampled``), ``-H - sum_head p_i log q_i - P_tail (1/S) sum_j log q(x_j)``
    (P_tail = 1 - the head's mass). H is the teacher's entropy, stored at temperature 1
    (``store_entropy``); without it (or at another temperature) the loss is the
    cross-entropy estimate, the KL plus a constant: the same gradient.
    Ranks ``generation.top_p`` left unused (logit -inf) count as probability 0.

    Returns ``(1 - ce_weight) * kd + ce_weight * ce`` (ce: mean cross-entropy of the
    student at temperature 1 against ``labels`` on the same rows), a float32 scalar
    (float64 for float64 logits). With no ``kd_mask`` row it is 0 with zero gradient.

    ``student_logits``: [B, L, V] (packed: [1, N, V]), any float dtype. Rows are read
    ``chunk_rows`` at a time (default: as many as fit in ~64 MiB of float32, 130 rows
    at V=128256); neither forward nor backward makes a float copy of all the logits.

    ``teacher_vocab_size`` (``store.vocab_size``): the student's V may be larger (ids
    past the teacher's are never targets), never smaller; without it, a smaller V is
    refused only when a stored id falls outside it.
    """
    if tail not in TAILS:
        raise TrainingInputError(f"kd_loss: tail={tail!r}; use one of {', '.join(TAILS)}")
    if tail == "auto":
        tail = "sampled" if "sampled_ids" in batch else "bucket"
    if not _is_number(ce_weight) or not 0.0 <= float(ce_weight) <= 1.0:
        raise TrainingInputError(f"kd_loss: ce_weight={ce_weight!r}; use a number in [0, 1]")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise TrainingInputError(f"kd_loss: temperature={temperature!r}; use a number > 0")
    if chunk_rows is not None and (
        not isinstance(chunk_rows, numbers.Integral)
        or isinstance(chunk_rows, bool)
        or chunk_rows < 1
    ):
        raise TrainingInputError(f"kd_loss: chunk_rows={chunk_rows!r}; use a positive integer")
    _check_logits(student_logits, batch, teacher_vocab_size)
    rows = _gather_rows(
        student_logits, batch, float(temperature), tail, float(ce_weight), chunk_rows
    )
    return ChunkedDistillationLoss.apply(student_logits, rows)


def _check_logits(student_logits, batch: dict, teacher_vocab_size: int | None) -> None:
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise TrainingInputError("kd_loss: student_logits must be a floating-point torch tensor")
    if teacher_vocab_size is not None and student_logits.shape[-1] < int(teacher_vocab_size):
        raise TrainingInputError(
            f"kd_loss: the student's logits cover {student_logits.shape[-1]} token ids but the "
            f"teacher's vocabulary has {int(teacher_vocab_size)}; {SMALLER_VOCAB}"
        )
    kd_mask = batch["kd_mask"]
    if student_logits.dim() != 3 or tuple(student_logits.shape[:2]) != tuple(kd_mask.shape):
        raise TrainingInputError(
            f"kd_loss: student_logits has shape {tuple(student_logits.shape)} but the batch is "
            f"{tuple(kd_mask.shape)} positions; pass the logits of every position [B, L, V] "
            "unshifted (collate already aligned labels and teacher rows)"
        )


def _gather_rows(
    student_logits, batch, temperature, tail, ce_weight, chunk_rows
) -> DistillationRows:
    device, vocab_size = student_logits.device, student_logits.shape[-1]
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    positions = batch["kd_mask"].nonzero()
    b, t = positions[:, 0], positions[:, 1]

    def rows_of(tensor: torch.Tensor) -> torch.Tensor:
        # The batch may still sit on the CPU while the logits are on a GPU: only these
        # rows travel.
        return tensor[b.to(tensor.device), t.to(tensor.device)].to(device)

    topk_ids = rows_of(batch["topk_ids"]).long()
    logprobs_t1 = rows_of(batch["topk_logprobs"]).to(compute_dtype)
    # Ranks top-p left unused (id 0, logit -inf) point at rank 0's id: no stray id 0.
    topk_ids = torch.where(torch.isneginf(logprobs_t1), topk_ids[:, :1], topk_ids)
    _check_tail(batch, tail, topk_ids.shape[1], temperature, ce_weight)
    drawn = tail == "sampled" and ce_weight < 1.0
    for what, ids in (("top-k", topk_ids), ("draws", batch["sampled_ids"] if drawn else None)):
        if ids is not None and ids.numel() and int(ids.max()) >= vocab_size:
            raise TrainingInputError(
                f"kd_loss: the teacher's {what} hold token id {int(ids.max())} but the "
                f"student's vocabulary has {vocab_size} entries; {SMALLER_VOCAB}"
            )
    labels = None
    if ce_weight > 0:
        labels = rows_of(batch["labels"]).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab_size):
            raise TrainingInputError(
                f"kd_loss: labels on kd_mask rows must lie in [0, {vocab_size}); found "
                f"{int(labels.min())}..{int(labels.max())}"
            )
    teacher_rest = target_weight = teacher_offset = None
    if ce_weight == 1.0:  # the teacher plays no part: no temperature to look up
        teacher_log_p = logprobs_t1
    elif tail == "sampled":
        teacher_log_p = logprobs_t1
        if temperature != 1.0 and topk_ids.shape[1]:
            lse_1 = rows_of(_logsumexp_at(batch, 1.0)).to(compute_dtype)
            lse_t = rows_of(_logsumexp_at(batch, temperature)).to(compute_dtype)
            teacher_log_p = (logprobs_t1 + lse_1[:, None]) / temperature - lse_t[:, None]
        head = teacher_log_p.exp()
        counts = rows_of(batch["sampled_counts"]).to(compute_dtype)
        tail_mass = (1.0 - head.sum(-1, keepdim=True)).clamp_min(0.0)
        target_weight = torch.cat([head, tail_mass * counts / counts.shape[-1]], dim=1)
        topk_ids = torch.cat([topk_ids, rows_of(batch["sampled_ids"]).long()], dim=1)
        teacher_offset = torch.zeros(len(b), dtype=compute_dtype, device=device)
        if temperature == 1.0 and "entropy" in batch:
            teacher_offset = -rows_of(batch["entropy"]).to(compute_dtype)
    elif tail == "bucket":
        teacher_log_p = logprobs_t1
        if temperature != 1.0:
            lse_1 = rows_of(_logsumexp_at(batch, 1.0)).to(compute_dtype)
            lse_t = rows_of(_logsumexp_at(batch, temperature)).to(compute_dtype)
            teacher_log_p = (logprobs_t1 + lse_1[:, None]) / temperature - lse_t[:, None]
        teacher_rest = (1.0 - teacher_log_p.exp().sum(-1)).clamp_min(0.0)
    else:
        # Renormalising cancels any per-row shift, so logits - logsumexp will do.
        teacher_log_p = torch.log_softmax(logprobs_t1 / temperature, dim=-1)
    return DistillationRows(
        batch_index=b.to(device),
        position_index=t.to(device),
        topk_ids=topk_ids,
        teacher_log_p=teacher_log_p,
        teacher_rest=teacher_rest,
        labels=labels,
        temperature=temperature,
        tail=tail,
        kd_weight=1.0 - ce_weight,
        ce_weight=ce_weight,
        chunk_rows=int(chunk_rows or default_chunk_rows(vocab_size, compute_dtype)),
        compute_dtype=compute_dtype,
        target_weight=target_weight,
        teacher_offset=teacher_offset,
    )


def _check_tail(batch: dict, tail: str, top_k: int, temperature: float, ce_weight: float):
    """The store's rows support this loss (draws for ``sampled``, a top-k otherwise)."""
    if ce_weight == 1.0:
        return
    if tail != "sampled" and not top_k:
        raise TrainingInputError(
            f"kd_loss(tail={tail!r}): the store has no top-k (written in `sampled` mode); "
            "use tail='sampled' (the default 'auto' picks it)"
        )
    if tail != "sampled":
        return
    if "sampled_ids" not in batch:
        raise TrainingInputError(
            "kd_loss(tail='sampled'): the batch has no draws; write the store with "
            "generation.mode: sampled or topk+sampled, or use tail='bucket'"
        )
    drawn_at = float(batch.get("sample_temperature", 1.0))
    if not math.isclose(temperature, drawn_at, rel_tol=1e-6):
        raise TrainingInputError(
            f"kd_loss(temperature={temperature:g}, tail='sampled'): the draws come from the "
            f"teacher's softmax at sample_temperature={drawn_at:g}, and ids and counts alone "
            f"cannot be reweighted to another; train at temperature={drawn_at:g}, use "
            "tail='bucket' (topk+sampled stores), or generate again with that temperature"
        )


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _logsumexp_at(batch: dict, temperature: float) -> torch.Tensor:
    return logsumexp_at(
        batch.get("logsumexp_t") or {},
        temperature,
        f"kd_loss(temperature={temperature:g}, tail='bucket')",
        "train at a stored temperature, or use tail='renormalize'",
    )


def logsumexp_at(stored: dict, temperature: float, asked: str, fix: str) -> torch.Tensor:
    """The teacher's logsumexp rows at ``temperature`` from ``stored`` ({temperature:
    rows}), or one line naming the temperatures the store has (``asked``: the call)."""
    for key, values in stored.items():
        if math.isclose(float(key), temperature, rel_tol=1e-6):
            return values
    listed = ", ".join(f"{float(key):g}" for key in sorted(stored)) or "none"
    raise TrainingInputError(
        f"{asked}: the store has the teacher's logsumexp at temperatures {listed} only; add "
        f"{temperature:g} to generation.temperatures in the workflow config and rerun the "
        f"workflow, {fix}"
    )
