"""The top-k row codec of format version 2 (file attribute ``topk_encoding``).

On disk, each row's k ids are sorted ascending and stored as the first id then
the gaps (``topk_ids``), with the values in that same order (``topk_logits``): a
row's ids are then small gaps that compress to about 40% of rank-ordered ids.
``decode_topk`` restores rank order (most likely first; equal stored values by
ascending id). Nothing but the order of exactly equal values is lost, so storage
stays lossless with respect to the stored value dtype. Pure numpy.
"""

from __future__ import annotations

import numpy as np


def _position_bits(top_k: int) -> int:
    return max(1, (top_k - 1).bit_length())


def encode_topk(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-ordered ``[n, k]`` ids and values -> (id deltas in id order, values in id order)."""
    ids = np.asarray(ids)
    n, k = ids.shape
    if n == 0:
        return ids.astype(np.int32), np.asarray(values)
    bits = _position_bits(k)
    # One row sort of (id, position) keys gives both the sorted ids and the permutation;
    # 32-bit keys where ids and positions fit (a 128k vocabulary at k=64: 23 bits) sort
    # about twice as fast as 64-bit ones.
    wide = int(ids.max()).bit_length() + bits > 32 or int(ids.min()) < 0
    key_type = np.int64 if wide else np.uint32
    key = (ids.astype(key_type) << key_type(bits)) | np.arange(k, dtype=key_type)
    key.sort(axis=1)
    order = (key & key_type((1 << bits) - 1)).astype(np.intp)
    order += (np.arange(n) * k)[:, None]
    sorted_ids = (key >> key_type(bits)).astype(np.int64, copy=False)
    deltas = np.empty((n, k), dtype=np.int32)
    deltas[:, 0] = sorted_ids[:, 0]
    np.subtract(sorted_ids[:, 1:], sorted_ids[:, :-1], out=deltas[:, 1:], casting="unsafe")
    return deltas, np.asarray(values).ravel()[order]


def ids_from_deltas(deltas: np.ndarray) -> np.ndarray:
    """Ids in ascending order per row (the stored order)."""
    return np.cumsum(deltas, axis=1, dtype=np.int32)


def _descending_key(bits_view: np.ndarray, sign: int, rest: int) -> np.ndarray:
    """Unsigned keys that sort ascending as the floats (given as their bits) sort descending.

    Its own inverse: positive floats flip their magnitude bits, negative ones keep them.
    """
    return bits_view ^ (((bits_view >> sign) - 1) & rest).astype(bits_view.dtype)


def decode_topk(deltas: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored (id deltas, values in id order) -> rank-ordered (ids, values).

    Most likely first; exactly equal values keep ascending id order. One row sort
    of (value key, position) gives the permutation; values come back out of the key.
    """
    n, k = deltas.shape
    ids = ids_from_deltas(deltas)
    if n == 0:
        return ids, values
    bits = _position_bits(k)
    positions = np.arange(k)
    if values.dtype == np.float16 and bits <= 16:
        desc = _descending_key(values.view(np.uint16), 15, 0x7FFF).astype(np.uint32)
        key = (desc << np.uint32(bits)) | positions.astype(np.uint32)
        key.sort(axis=1)
        order = (key & np.uint32((1 << bits) - 1)).astype(np.intp)
        out_values = _descending_key((key >> np.uint32(bits)).astype(np.uint16), 15, 0x7FFF)
        out_values = out_values.view(np.float16)
    else:
        desc = _descending_key(values.astype(np.float32).view(np.uint32), 31, 0x7FFFFFFF)
        key = (desc.astype(np.uint64) << np.uint64(bits)) | positions.astype(np.uint64)
        key.sort(axis=1)
        order = (key & np.uint64((1 << bits) - 1)).astype(np.intp)
        out_values = np.take_along_axis(values, order, axis=1)
    order += (np.arange(n) * k)[:, None]
    return ids.ravel()[order], out_values
