"""The cross-tokenizer fields (``storage.cross_tokenizer_fields``): the text the teacher
read, each token's byte span in it, and the teacher's log-probability of the actual next
token; how the reader gets them and the checks gather and ``verify --deep`` run on them.

- ``text_bytes`` uint8 [B]: every sample's text, UTF-8, concatenated in sample order
  (chat: the rendered template; a truncated sample: the start its tokens cover).
- ``text_offsets`` int64 [S+1]: sample s's text is ``text_bytes[text_offsets[s]:
  text_offsets[s+1]]``.
- ``token_offsets`` int32 [T, 2]: token t's ``[start, end)`` in its sample's text bytes;
  a token added without text (BOS) has an empty span where the token before it ended.
- ``target_logprob`` float32 [rows]: log p(input_ids[t+1] | tokens <= t) at temperature 1
  (the next token's logit - logsumexp), NaN on each sample's last row. A row dataset: with
  ``store_masked_only`` only the kept rows are stored, and the reader gives NaN for the rest.

All four or none: a shard from before them, or made with the setting off, has none, and
a store may mix both kinds. Needs numpy and h5py only.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShardError

TEXT_DATASETS = ("text_bytes", "text_offsets")
CROSS_DATASETS = (*TEXT_DATASETS, "token_offsets", "target_logprob")
# Where a target log-probability may exceed 0 (float32 rounding of logit - logsumexp).
LOGPROB_SLACK = 1e-4
MISSING_FIX = (
    "generate it again with storage.cross_tokenizer_fields: true (the default), e.g. "
    "snakemake --config force_regenerate=true"
)


def has_cross_fields(handle) -> bool:
    return all(name in handle for name in CROSS_DATASETS)


def text_datasets(handle) -> dict:
    """What ``sample_text`` reads, for a reader's per-shard dict: the text bytes dataset
    and the (small) text offsets in memory."""
    if "text_offsets" not in handle:
        return {}
    return {"text_bytes": handle["text_bytes"], "text_offsets": handle["text_offsets"][:]}


def sample_text(handle, position: int) -> str:
    start, stop = handle["text_offsets"][position : position + 2]
    return bytes(handle["text_bytes"][int(start) : int(stop)]).decode()


def cross_shapes(num_samples: int, num_tokens: int, num_rows: int) -> dict:
    """name -> (shape, dtype) of the four datasets (``text_bytes``: any length)."""
    return {
        "text_bytes": (None, np.uint8),
        "text_offsets": ((num_samples + 1,), np.int64),
        "token_offsets": ((num_tokens, 2), np.int32),
        "target_logprob": ((num_rows,), np.float32),
    }


def check_cross_fields(handle, offsets: np.ndarray, num_rows: int) -> None:
    """All four or none; shapes; texts UTF-8; every span inside its text, starts in order."""
    present = [name for name in CROSS_DATASETS if name in handle]
    if not present:
        return
    if len(present) != len(CROSS_DATASETS):
        missing = [name for name in CROSS_DATASETS if name not in handle]
        raise ShardError(
            f"has {present} but not {missing} (the cross-tokenizer fields go together)"
        )
    num_samples, num_tokens = len(offsets) - 1, int(offsets[-1])
    for name, (shape, dtype) in cross_shapes(num_samples, num_tokens, num_rows).items():
        ds = handle[name]
        if (
            (shape is not None and ds.shape != shape)
            or ds.dtype != dtype
            or ds.ndim != (len(shape) if shape else 1)
        ):
            raise ShardError(
                f"dataset {name!r} has shape {ds.shape} and dtype {ds.dtype}, expected "
                f"{shape or '[bytes]'} {np.dtype(dtype)}"
            )
    text_at = handle["text_offsets"][:]
    data = handle["text_bytes"][:]
    if text_at[0] != 0 or (np.diff(text_at) < 0).any() or text_at[-1] != len(data):
        raise ShardError("text_offsets do not tile text_bytes in order")
    starts = text_at[:-1][text_at[:-1] < len(data)]
    # A text may not start inside a character (a continuation byte 10xxxxxx).
    if ((data[starts] & 0xC0) == 0x80).any():
        raise ShardError("a sample's text in text_bytes starts inside a UTF-8 character")
    try:
        data.tobytes().decode()
    except UnicodeDecodeError as exc:
        raise ShardError(f"text_bytes is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    spans = handle["token_offsets"][:].astype(np.int64)
    text_length = np.repeat(np.diff(text_at), np.diff(offsets))
    start, end = spans[:, 0], spans[:, 1]
    outside = (start < 0) | (end < start) | (end > text_length)
    if outside.any():
        token = int(np.flatnonzero(outside)[0])
        raise ShardError(
            f"token_offsets of token {token} ({start[token]}, {end[token]}) are not a span "
            f"inside its text of {text_length[token]} bytes"
        )
    first = np.zeros(num_tokens, dtype=bool)
    first[offsets[:-1][offsets[:-1] < num_tokens]] = True
    backwards = ~first[1:] & (start[1:] < start[:-1])
    if backwards.any():
        token = int(np.flatnonzero(backwards)[0]) + 1
        raise ShardError(f"token_offsets go backwards at token {token} (starts must not decrease)")


def check_target_rows(handle, span: tuple, has_next: np.ndarray, next_ids, top=None) -> None:
    """``target_logprob`` of stored rows ``span`` (c0, c1): NaN exactly where the row has no
    next token in its sample (``has_next`` False); elsewhere finite, at most 0, and equal to
    the top-k value (logit - logsumexp) where the next token is among the row's top-k.
    ``top``: (ids int64 [rows, k], float32 logits, logsumexp, tolerance [rows, k]) or None."""
    c0, c1 = span
    target = handle["target_logprob"][c0:c1]
    where = f"rows {c0}..{c1 - 1}"
    if (np.isnan(target) != ~has_next).any():
        row = c0 + int(np.flatnonzero(np.isnan(target) != ~has_next)[0])
        raise ShardError(
            f"target_logprob of row {row} is NaN where a next token exists, or not NaN on a "
            "sample's last row"
        )
    known = target[has_next]
    if not np.isfinite(known).all() or (known > LOGPROB_SLACK).any():
        raise ShardError(f"target_logprob above 0 or not finite in {where}")
    if top is None:
        return
    ids, logits, lse, tolerance = top
    hit = (ids == np.asarray(next_ids)[:, None]) & has_next[:, None]
    expected = logits - lse[:, None]
    off = hit & (np.abs(expected - target[:, None]) > tolerance)
    if off.any():
        row, rank = (int(v[0]) for v in np.nonzero(off))
        raise ShardError(
            f"target_logprob of row {c0 + row} is {target[row]:.6g}, but its next token is "
            f"top-k rank {rank} with log-probability {expected[row, rank]:.6g}"
        )


def value_tolerance(handle, logits: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """How far a stored top-k value may be from the float32 logit it rounds (its dtype)."""
    dtype = handle["topk_logits"].dtype
    if dtype == np.uint8:  # int8 codes: half a step of the row's scale
        step = handle["topk_logits_step"][c0:c1].astype(np.float32)
        return np.broadcast_to(0.5 * step[:, None] + 1e-4, logits.shape)
    relative = 1e-3 if dtype == np.float16 else 1e-5
    return relative * np.maximum(1.0, np.abs(np.nan_to_num(logits, neginf=0.0))) + 1e-5
