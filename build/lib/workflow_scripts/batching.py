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
