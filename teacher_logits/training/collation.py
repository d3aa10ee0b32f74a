"""Store records -> one batch of torch tensors for a student's training step.

    loader = DataLoader(store, batch_sampler=sampler, collate_fn=collate, num_workers=4)
    packed = functools.partial(collate, max_length=4096, pack=True)   # options: partial

Shift convention: position t of a batch holds token t, the teacher's row t (its
distribution over token t+1) and ``labels[t] = input_ids[t+1]``. The student's
logits at position t therefore line up with ``labels[t]`` and the teacher's row
as they are: nothing is shifted again, and ``labels`` must not be handed to a
Hugging Face model's forward (which shifts its labels itself).

Positions that carry no target (padding, each sample's last token, chat tokens
whose next token is not trained on) have ``labels == -100`` and ``kd_mask`` false;
their teacher rows are filled with zeros (``topk_ids`` 0, ``topk_logprobs`` 0,
``logsumexp_t`` 0) and must only be read through ``kd_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TrainingInputError

IGNORE_INDEX = -100  # what torch's and Hugging Face's cross-entropy skip


@dataclass
class _Sample:
    """One record cropped and shifted: everything per position, numpy, length n."""

    sample_id: int
    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    topk_ids: np.ndarray  # int64 [n, k]
    topk_logprobs: np.ndarray  # float32 [n, k]
    logsumexp_t: dict  # {temperature: float32 [n]}
    # Sampled stores: sampled_ids / sampled_counts int64 [n, S]; entropy float32 [n] when
    # stored (the sampled estimators' constant term).
    extras: dict
    sample_temperature: float | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def collate(
    records: list[dict],
    pad_id: int = 0,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    pack: bool = False,
) -> dict:
    """Pad (or pack) store records into torch tensors.

    Returns ``input_ids`` int64 [B, L], ``attention_mask`` bool [B, L], ``labels``
    int64 [B, L] (``input_ids[t+1]``; -100 at padding, at each sample's last position
    and, for chat data, where ``loss_mask[t+1] == 0``), ``kd_mask`` bool [B, L]
    (``labels != -100``), ``topk_ids`` int64 [B, L, k], ``topk_logprobs`` float32
    [B, L, k] (temperature-1 log-probabilities of the teacher's top-k),
    ``logsumexp_t`` {temperature: float32 [B, L]} and ``sample_id`` int64 [B].
    A `sampled` store has k = 0. Sampled stores add ``sampled_ids`` and
    ``sampled_counts`` int64 [B, L, S] and ``sample_temperature`` (float); a store
    with entropy adds ``entropy`` float32 [B, L] (what ``kd_loss`` turns the draws'
    cross-entropy into a KL with).

    ``max_length`` keeps each sample's first ``max_length`` tokens; the last kept
    position is still trained on the next original token (its teacher row is
    stored). ``pad_to_multiple_of`` rounds L up.

    ``pack=True`` lays all samples end to end in one row [1, N] with ``position_ids``
    restarting at 0 per sample, ``cu_seq_lens`` int32 (segment boundaries, the
    flash-attention varlen convention) and ``max_seq_len`` int, and no
    ``attention_mask``: Hugging Face models then keep attention inside each sample
    (eager, sdpa, flex_attention and flash_attention_2/3 all do) provided no KV
    cache is made, so pass ``use_cache=False`` (with a cache, eager/sdpa/flex
    silently attend across samples). Flash attention may also take the boundaries
    directly: ``cu_seq_lens_q=cu_seq_lens_k=batch["cu_seq_lens"]``,
    ``max_length_q=max_length_k=batch["max_seq_len"]``. Padding up to
    ``pad_to_multiple_of`` is one more segment at the end, with ``labels`` -100.
    """
    _check_options(records, max_length, pad_to_multiple_of)
    samples = [_prepare(record, max_length) for record in records]
    _check_consistent(samples)
    if pack:
        return _packed(samples, pad_id, pad_to_multiple_of)
    return _padded(samples, pad_id, pad_to_multiple_of)


def _check_options(records, max_length, pad_to_multiple_of) -> None:
    if not isinstance(records, (list, tuple)) or not records:
        raise TrainingInputError("collate needs a non-empty list of store records")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise TrainingInputError(
            f"collate: max_length={max_length!r} leaves no (token, next token) pair to train "
            "on; use an integer >= 2, or None to keep whole samples"
        )
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool)
        or not isinstance(pad_to_multiple_of, int)
        or pad_to_multiple_of < 1
    ):
        raise TrainingInputError(
            f"collate: pad_to_multiple_of={pad_to_multiple_of!r}; use a positive integer or None"
        )


def _prepare(record: dict, max_length: int | None) -> _Sample:
    sample_id = int(record["sample_id"])
    if "topk_ids" not in record and "sampled_ids" not in record:
        raise TrainingInputError(
            f"sample {sample_id} has neither top-k rows nor draws; pass records of a "
            "LogitStore (store[i]) as they come"
        )
    input_ids = np.asarray(record["input_ids"])
    full_length = len(input_ids)
    n = full_length if max_length is None else min(full_length, max_length)

    # Row t predicts token t+1. After a crop the last kept row still has its next
    # token in the record (and its teacher row is stored), so it keeps its target.
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    next_tokens = input_ids[1 : n + 1]
    labels[: len(next_tokens)] = next_tokens
    if "loss_mask" in record:
        untrained = np.asarray(record["loss_mask"])[1 : n + 1] == 0
        labels[: len(next_tokens)][untrained] = IGNORE_INDEX
    trained = labels != IGNORE_INDEX
    if "row_stored" in record:
        missing = np.flatnonzero(trained & (np.asarray(record["row_stored"])[:n] == 0))
        if len(missing):
            raise TrainingInputError(
                f"sample {sample_id}: row {int(missing[0])} is trained on but its teacher row "
                "was not stored; the store's loss_mask and row_offsets disagree, regenerate it"
            )

    logsumexp = np.asarray(record["logsumexp"][:n], dtype=np.float32)
    if "topk_ids" in record:
        topk_ids = np.asarray(record["topk_ids"][:n], dtype=np.int64)
        topk_logits = np.asarray(record["topk_logits"][:n], dtype=np.float32)
    else:  # a `sampled` store: no top-k
        topk_ids, topk_logits = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    topk_logprobs = topk_logits - logsumexp[:, None]
    per_temperature = record.get("logsumexp_t") or {}
    logsumexp_t = {
        float(t): np.asarray(v[:n], dtype=np.float32) for t, v in per_temperature.items()
    }
    logsumexp_t.setdefault(1.0, logsumexp)
    extras = {
        name: np.asarray(record[name][:n], dtype=dtype)
        for name, dtype in (
            ("sampled_ids", np.int64),
            ("sampled_counts", np.int64),
            ("entropy", np.float32),
        )
        if name in record
    }
    if "row_stored" in record:
        # Absent rows read as zeros already; zero the derived log-probs too, so the
        # documented fill (0) holds for every row a trainer must not read.
        absent = np.asarray(record["row_stored"])[:n] == 0
        topk_logprobs[absent] = 0.0
    return _Sample(
        sample_id=sample_id,
        input_ids=input_ids[:n].astype(np.int64),
        labels=labels,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        logsumexp_t=logsumexp_t,
        extras=extras,
        sample_temperature=record.get("sample_temperature"),
    )


def _check_consistent(samples: list[_Sample]) -> None:
    first = samples[0]
    for sample in samples[1:]:
        if sample.topk_ids.shape[1] != first.topk_ids.shape[1]:
            raise TrainingInputError(
                f"samples {first.sample_id} and {sample.sample_id} have different top_k "
                f"({first.topk_ids.shape[1]} and {sample.topk_ids.shape[1]}); batch samples "
                "of one store"
            )
        shapes = {name: value.shape[1:] for name, value in sample.extras.items()}
        if shapes != {name: value.shape[1:] for name, value in first.extras.items()}:
            raise TrainingInputError(
                f"samples {first.sample_id} and {sample.sample_id} carry different sampled "
                "rows or entropy; batch samples of one store"
            )
        if set(sample.logsumexp_t) != set(first.logsumexp_t):
            raise TrainingInputError(
                f"samples {first.sample_id} and {sample.sample_id} carry different temperatures "
                f"({sorted(first.logsumexp_t)} and {sorted(sample.logsumexp_t)}); batch "
                "samples of one store"
            )


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def _padded(samples: list[_Sample], pad_id: int, pad_to_multiple_of: int | None) -> dict:
    width = _round_up(max(len(s) for s in samples), pad_to_multiple_of)
    rows, top_k = len(samples), samples[0].topk_ids.shape[1]
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=bool)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    topk_ids = np.zeros((rows, width, top_k), dtype=np.int64)
    topk_logprobs = np.zeros((rows, width, top_k), dtype=np.float32)
    logsumexp_t = {t: np.zeros((rows, width), dtype=np.float32) for t in samples[0].logsumexp_t}
    extras = {
        name: np.zeros((rows, width, *value.shape[1:]), dtype=value.dtype)
        for name, value in samples[0].extras.items()
    }
    for row, sample in enumerate(samples):
        n = len(sample)
        input_ids[row, :n] = sample.input_ids
        attention_mask[row, :n] = True
        labels[row, :n] = sample.labels
        topk_ids[row, :n] = sample.topk_ids
        topk_logprobs[row, :n] = sample.topk_logprobs
        for temperature, values in sample.logsumexp_t.items():
            logsumexp_t[temperature][row, :n] = values
        for name, values in sample.extras.items():
            extras[name][row, :n] = values
    return _as_tensors(
        samples,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        logsumexp_t=logsumexp_t,
        **extras,
    )


def _packed(samples: list[_Sample], pad_id: int, pad_to_multiple_of: int | None) -> dict:
    lengths = [len(s) for s in samples]
    total = sum(lengths)
    padding = _round_up(total, pad_to_multiple_of) - total
    # The padding is a segment of its own (positions from 0, labels -100), so it can
    # neither see nor be seen by a real sample, and cu_seq_lens covers every position.
    segments = lengths + ([padding] if padding else [])
    top_k = samples[0].topk_ids.shape[1]

    def joined(name: str, fill, dtype, trailing=()) -> np.ndarray:
        parts = [getattr(s, name) for s in samples]
        parts.append(np.full((padding, *trailing), fill, dtype=dtype))
        return np.concatenate(parts).astype(dtype, copy=False)[None]

    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in segments])
    cu_seq_lens = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
    logsumexp_t = {
        t: np.concatenate([s.logsumexp_t[t] for s in samples] + [np.zeros(padding, np.float32)])[
            None
        ]
        for t in samples[0].logsumexp_t
    }
    batch = _as_tensors(
        samples,
        input_ids=joined("input_ids", pad_id, np.int64),
        labels=joined("labels", IGNORE_INDEX, np.int64),
        topk_ids=joined("topk_ids", 0, np.int64, (top_k,)),
        topk_logprobs=joined("topk_logprobs", 0.0, np.float32, (top_k,)),
        logsumexp_t=logsumexp_t,
        position_ids=position_ids[None],
        cu_seq_lens=cu_seq_lens,
        **{name: joined_extra(samples, name, padding) for name in samples[0].extras},
    )
    batch["max_seq_len"] = int(max(segments, default=0))
    return batch


def _as_tensors(samples: list[_Sample], logsumexp_t: dict, **arrays) -> dict:
    batch = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    batch["kd_mask"] = batch["labels"] != IGNORE_INDEX
    batch["logsumexp_t"] = {t: torch.from_numpy(v) for t, v in logsumexp_t.items()}
    batch["sample_id"] = torch.tensor([s.sample_id for s in samples], dtype=torch.int64)
    if samples[0].sample_temperature is not None:
        batch["sample_temperature"] = float(samples[0].sample_temperature)
    return batch


def joined_extra(samples: list[_Sample], name: str, padding: int) -> np.ndarray:
    """A sampled-row or entropy array of packed samples, zeros over the padding."""
    first = samples[0].extras[name]
    fill = np.zeros((padding, *first.shape[1:]), dtype=first.dtype)
    return np.concatenate([s.extras[name] for s in samples] + [fill])[None]
