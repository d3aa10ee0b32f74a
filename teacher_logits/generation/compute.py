"""Batch compute: a window of samples -> the teacher's top-k rows, in sample order.

A window's samples are packed into token-budget batches (``batching``), each
batch runs through the top-k head, and an out-of-memory batch is retried as two
halves. Documents longer than ``max_length`` (``overflow: split``) are read in
overlapping windows and each row is kept from exactly one of them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import TeacherError
from ..sampling import counts_from_draws
from ..store.format import temperature_dataset
from .batching import long_document_windows, plan_batches

log = logging.getLogger("generate")


def forward_batch(
    head,
    batch: np.ndarray,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    pad_id: int,
    row_keys=None,
    targets=None,
):
    """Top-k of one padded batch; on out-of-memory, retry it as two halves (logged).
    ``row_keys``: the window's ``sampling.row_keys``, for the sampled modes; ``targets``:
    each row's next token id (-1: none), for ``target_logprob``."""
    lengths = offsets[batch + 1] - offsets[batch]
    width = int(lengths.max())
    try:
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sample in enumerate(batch):
            start, stop = offsets[sample], offsets[sample + 1]
            ids[row, : stop - start] = torch.from_numpy(input_ids[start:stop].astype(np.int64))
            mask[row, : stop - start] = 1
        if row_keys is None and targets is None:
            return [head(ids, mask)]
        keys = None if row_keys is None else _rows_of(row_keys, batch, offsets)
        if targets is None:
            return [head(ids, mask, keys)]
        return [head(ids, mask, keys, targets=_rows_of(targets, batch, offsets))]
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            raise TeacherError(
                f"out of memory on a single sample of {width} tokens ({exc}); lower "
                "tokenize.max_length or give each model more GPUs (gpus_per_model)"
            ) from None
        half = len(batch) // 2
        log.warning(
            "out of memory on a batch of %d samples x %d tokens; retrying it as two halves "
            "(consider a smaller generation.batch_tokens)",
            len(batch),
            width,
        )
        return forward_batch(
            head, batch[:half], input_ids, offsets, pad_id, row_keys, targets
        ) + forward_batch(head, batch[half:], input_ids, offsets, pad_id, row_keys, targets)


def _rows_of(values: np.ndarray, batch: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The batch's samples' entries of a per-row array, in batch order."""
    return np.concatenate([values[offsets[s] : offsets[s + 1]] for s in batch])


def next_token_targets(input_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64 per row: the id of the next token in its sample, -1 on each sample's last row."""
    targets = np.full(len(input_ids), -1, dtype=np.int64)
    targets[:-1] = input_ids[1:]
    ends = np.asarray(offsets)[1:]
    targets[ends[ends > 0] - 1] = -1
    return targets


def compute_window(
    head,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    batch_tokens: int,
    pad_id: int,
    row_keys=None,
    targets=None,
):
    """Top-k rows of the samples in one window, concatenated in sample order, keyed by
    their shard dataset names (each extra temperature's logsumexp under its own; the
    draws as ``sampled_ids``/``sampled_counts`` when ``row_keys`` seed them;
    ``target_logprob`` when ``targets`` name each row's next token, -1 for none)."""
    lengths = np.diff(offsets)
    num_rows = int(offsets[-1])
    out = {
        "topk_ids": np.empty((num_rows, head.top_k), dtype=np.int32),
        "topk_logits": np.empty((num_rows, head.top_k), dtype=np.float32),
        "logsumexp": np.empty(num_rows, dtype=np.float32),
        "entropy": np.empty(num_rows, dtype=np.float32),
    }
    for batch in plan_batches(lengths, batch_tokens):
        results = forward_batch(head, batch, input_ids, offsets, pad_id, row_keys, targets)
        samples = iter(batch)
        for result in results:
            # Valid positions come back row-major: sample by sample in batch order.
            cursor = 0
            while cursor < len(result.logsumexp):
                sample = next(samples)
                start, stop = int(offsets[sample]), int(offsets[sample + 1])
                n = stop - start
                out["topk_ids"][start:stop] = result.ids[cursor : cursor + n].numpy()
                out["topk_logits"][start:stop] = result.logits[cursor : cursor + n].numpy()
                out["logsumexp"][start:stop] = result.logsumexp[cursor : cursor + n].numpy()
                out["entropy"][start:stop] = result.entropy[cursor : cursor + n].numpy()
                for temperature, lse in result.logsumexp_t.items():
                    name = temperature_dataset(temperature)
                    column = out.setdefault(name, np.empty(num_rows, dtype=np.float32))
                    column[start:stop] = lse[cursor : cursor + n].numpy()
                if result.draws is not None:
                    draws = out.setdefault(
                        "draws", np.empty((num_rows, result.draws.shape[1]), np.int32)
                    )
                    draws[start:stop] = result.draws[cursor : cursor + n].numpy()
                    void = out.setdefault("void", np.empty(num_rows, bool))
                    void[start:stop] = ~np.isfinite(result.tail_lse[cursor : cursor + n].numpy())
                if result.target_logit is not None:
                    column = out.setdefault("target_logprob", np.empty(num_rows, np.float32))
                    column[start:stop] = result.target_logit[cursor : cursor + n].numpy()
                cursor += n
    if "target_logprob" in out:  # logit - logsumexp, NaN where no next token was given
        picked = out["target_logprob"] - out["logsumexp"]
        out["target_logprob"] = np.where(targets >= 0, picked, np.nan).astype(np.float32)
    if "draws" in out:
        void = out.pop("void")
        out["sampled_ids"], out["sampled_counts"] = counts_from_draws(out.pop("draws"), ~void)
    if not head.top_k:  # sampled mode: no top-k datasets
        del out["topk_ids"], out["topk_logits"]
    return out


def compute_window_split(
    head,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    batch_tokens: int,
    pad_id: int,
    max_length: int,
    stride: int,
    row_keys=None,
    with_targets: bool = False,
):
    """``compute_window`` where documents may be longer than ``max_length`` (overflow: split).

    Each long document is read in overlapping windows of at most ``max_length`` tokens
    (``long_document_windows``); the windows are batched like short samples, and each
    row is taken from the one window that keeps it. Windows that fit change nothing.
    ``with_targets``: ``target_logprob`` too; a window's last kept row predicts the
    document's next token, which only the next window reads.
    """
    lengths = np.diff(offsets)
    targets = next_token_targets(input_ids, offsets) if with_targets else None
    if not len(lengths) or int(lengths.max()) <= max_length:
        return compute_window(head, input_ids, offsets, batch_tokens, pad_id, row_keys, targets)
    cut = long_document_windows(lengths, max_length, stride)
    starts = offsets[cut["sample"]] + cut["start"]
    stops = offsets[cut["sample"]] + cut["stop"]
    window_ids = np.concatenate([input_ids[a:b] for a, b in zip(starts, stops)])
    window_offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
    window_keys = window_targets = None
    if row_keys is not None:  # a row's key is its place in the document, whichever window
        window_keys = np.concatenate([row_keys[a:b] for a, b in zip(starts, stops)])
    if targets is not None:  # likewise its target: the document's next token
        window_targets = np.concatenate([targets[a:b] for a, b in zip(starts, stops)])
    rows = compute_window(
        head, window_ids, window_offsets, batch_tokens, pad_id, window_keys, window_targets
    )
    # Kept rows tile each document in order, and windows come in document order, so
    # the kept rows, concatenated, are the window's rows in token order.
    first = window_offsets[:-1] + (cut["keep_start"] - cut["start"])
    keep = np.concatenate([np.arange(a, b) for a, b in zip(first, window_offsets[1:])])
    return {name: values[keep] for name, values in rows.items()}
