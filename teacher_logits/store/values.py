"""Lossy, opt-in ways to store fewer bytes of top-k values. Pure numpy.

- ``storage.value_dtype: int8``: each row's values as 8-bit codes relative to the
  row's largest logit, ``value = top - code * step`` with ``top`` and ``step`` stored
  per row (float32 ``topk_logits_max`` / ``topk_logits_step``). Raw logits near 20
  would lose about 1 in log space in an 8-bit float; relative to the row's top the
  error is at most ``step / 2`` = (top - lowest kept) / 508, a few hundredths of a nat
  at top_k 64, and the top logit itself is exact. Code 255 is -inf (a rank top-p
  left unused).
- ``generation.top_p``: keep ranks until their probability reaches p (at most top_k);
  the others read back as id 0 with logit -inf.
"""

from __future__ import annotations

import numpy as np

# Datasets an int8 store adds (one float32 per row each).
SCALE_DATASETS = ("topk_logits_max", "topk_logits_step")
UNUSED_CODE = 255
_LEVELS = UNUSED_CODE - 1


def encode_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float [N, k] (any order; -inf for unused ranks) -> (codes uint8, top, step float32)."""
    values = np.asarray(values, dtype=np.float32)
    n = len(values)
    if not values.size:
        return values.astype(np.uint8), np.zeros(n, np.float32), np.ones(n, np.float32)
    finite = np.isfinite(values)
    top = np.where(finite, values, -np.inf).max(axis=1)
    low = np.where(finite, values, np.inf).min(axis=1)
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
    spread = np.where(np.isfinite(low), top - low, 0.0)
    step = np.where(spread > 0, spread / _LEVELS, 1.0).astype(np.float32)
    with np.errstate(invalid="ignore"):
        codes = np.rint((top[:, None] - values) / step[:, None])
    codes = np.where(finite, np.clip(codes, 0, _LEVELS), UNUSED_CODE).astype(np.uint8)
    return codes, top, step


def decode_int8(codes: np.ndarray, top: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The float32 values of ``encode_int8``'s codes (unused ranks -inf)."""
    codes = np.asarray(codes)
    values = np.asarray(top, np.float32)[:, None] - codes * np.asarray(step, np.float32)[:, None]
    values[codes == UNUSED_CODE] = -np.inf
    return values.astype(np.float32, copy=False)


def truncate_top_p(ids: np.ndarray, logits: np.ndarray, logsumexp: np.ndarray, top_p: float):
    """Rank-ordered rows with the ranks past mass ``top_p`` set to id 0 and logit -inf.

    A rank is kept while the ranks before it hold less than ``top_p`` of the row's
    probability, so the most likely one always is. Returns new arrays.
    """
    ids = np.array(ids, copy=True)
    logits = np.array(logits, dtype=np.float32, copy=True)
    probs = np.exp(logits.astype(np.float64) - np.asarray(logsumexp, np.float64)[:, None])
    before = np.cumsum(probs, axis=1) - probs
    unused = before >= top_p
    ids[unused] = 0
    logits[unused] = -np.inf
    return ids, logits
