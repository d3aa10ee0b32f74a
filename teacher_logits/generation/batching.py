"""Token-budget batches over length-sorted samples (pure numpy, no torch).

A shard is processed in windows of consecutive samples so results can be written
in order; inside a window, samples are sorted by length and packed greedily so a
padded batch (count x longest) stays within ``batch_tokens`` and little compute
goes to padding.
"""

from __future__ import annotations

import numpy as np


def windows(lengths: np.ndarray, window_tokens: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` sample ranges of about ``window_tokens`` tokens each."""
    bounds, start, total = [], 0, 0
    for i, length in enumerate(lengths):
        total += int(length)
        if total >= window_tokens:
            bounds.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices into ``lengths`` grouped so that ``len(batch) * max(length) <= batch_tokens``.

    Longest first; a sample longer than the budget forms a batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for index in order:
        length = int(lengths[index])
        widest = max(longest, length)
        if current and (len(current) + 1) * widest > batch_tokens:
            batches.append(np.array(current))
            current, widest = [], length
        current.append(int(index))
        longest = widest
    if current:
        batches.append(np.array(current))
    return batches


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of computed positions that are padding."""
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - float(np.sum(lengths)) / computed if computed else 0.0


def long_document_windows(lengths: np.ndarray, max_length: int, stride: int) -> dict:
    """Cut samples longer than ``max_length`` into overlapping windows (``overflow: split``).

    Window j of a sample starts at ``j * (max_length - stride)`` and reads up to
    ``max_length`` tokens, so it carries ``stride`` tokens of left context over from
    window j-1. Each row is kept from exactly one window: the earliest that holds it,
    which is the one that gave it the most context. Samples that fit are one window.

    Returns int64 arrays, one entry per window, positions relative to the sample:
    ``sample``, ``start``/``stop`` (tokens read) and ``keep_start`` (rows
    ``keep_start:stop`` are kept; earlier rows were kept from the previous window).
    """
    if not 0 <= stride < max_length:
        raise ValueError(f"stride {stride} must be in [0, max_length={max_length})")
    step = max_length - stride
    lengths = np.asarray(lengths, dtype=np.int64)
    # Windows per sample: 1 if it fits, else enough steps for the last to reach the end.
    counts = np.where(lengths <= max_length, 1, 1 + -(-(lengths - max_length) // step))
    sample = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    index = np.arange(len(sample), dtype=np.int64) - np.repeat(first, counts)
    start = index * step
    stop = np.minimum(start + max_length, lengths[sample])
    keep_start = np.where(index == 0, 0, start + stride)
    return {"sample": sample, "start": start, "stop": stop, "keep_start": keep_start}
