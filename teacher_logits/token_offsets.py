"""Each token's ``[start, end)`` span in the UTF-8 bytes of the text it came from.

A student with another tokenizer aligns its tokens with the teacher's by these spans
(``storage.cross_tokenizer_fields``). A fast tokenizer's offset mapping gives character
spans: they become byte spans here, and the tokens that split one multi-byte character
(byte-level BPE, byte fallback) get their own bytes of it, in order. A token the
tokenizer added without text (BOS, EOS) has an empty span at the end of the token before
it. A tokenizer without offsets (a slow one) gets them by decoding each token and
matching it at the place the previous one ended; a token that does not match there is a
``TeacherError`` naming the tokenizer.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .errors import TeacherError

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def utf8_positions(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the byte offset of each character (and of the end)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = np.ones(len(code_points), dtype=np.int64)
    for limit in (0x80, 0x800, 0x10000):
        widths += code_points >= limit
    return np.concatenate([[0], np.cumsum(widths)])


class TokenOffsets:
    """Byte spans of a tokenizer's tokens (one per tokenizer: what its tokens' byte lengths
    are is read once from its decoder)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self.byte_level = self.fast and _has_byte_level_decoder(tokenizer)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])

    def from_char_offsets(self, text: str, ids, char_offsets) -> np.ndarray:
        """int32 [n, 2] byte spans from a fast tokenizer's character spans."""
        chars = np.asarray(char_offsets, dtype=np.int64).reshape(-1, 2)
        spans = utf8_positions(text)[chars]
        empty = chars[:, 0] == chars[:, 1]
        if empty.any():
            before = np.maximum.accumulate(np.where(empty, 0, spans[:, 1]))
            at = np.concatenate([[0], before[:-1]])
            spans[empty] = at[empty, None]
        self._split_shared_characters(spans, ids)
        return spans.astype(np.int32)

    def _split_shared_characters(self, spans: np.ndarray, ids) -> None:
        """Tokens that start inside the token before them hold parts of one character:
        give each its own bytes where their byte lengths are known."""
        inside = np.flatnonzero(spans[1:, 0] < spans[:-1, 1]) + 1
        if not len(inside):
            return
        tokens = self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        # Runs of tokens each starting inside the one before it.
        starts = inside[np.concatenate([[True], np.diff(inside) > 1])] - 1
        for first in starts:
            last = first + 1
            while last + 1 < len(spans) and spans[last + 1, 0] < spans[last, 1]:
                last += 1
            lengths = [self._byte_length(t) for t in tokens[first : last + 1]]
            lo, hi = spans[first, 0], spans[first : last + 1, 1].max()
            if None not in lengths and sum(lengths) == hi - lo:
                ends = lo + np.cumsum(lengths)
                spans[first : last + 1, 0] = np.concatenate([[lo], ends[:-1]])
                spans[first : last + 1, 1] = ends

    def _byte_length(self, token: str) -> int | None:
        if _BYTE_FALLBACK.fullmatch(token):
            return 1
        return len(token) if self.byte_level else None

    def by_decoding(self, text: str, ids, truncated: bool = False) -> np.ndarray:
        """int32 [n, 2] byte spans of a tokenizer without an offset mapping: each token's
        decoded bytes matched where the one before it ended (a special token that is not
        there was added without text: an empty span). The concatenation must reproduce
        the text (its start, when ``truncated``)."""
        data = text.encode()
        spans = np.zeros((len(ids), 2), dtype=np.int32)
        cursor = 0
        for i, token_id in enumerate(ids):
            piece = self.tokenizer.decode(
                [int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False
            ).encode()
            if data.startswith(piece, cursor):
                spans[i] = cursor, cursor + len(piece)
                cursor += len(piece)
            elif int(token_id) in self.special_ids:
                spans[i] = cursor, cursor
            else:
                raise self._refusal(f"token {i} (id {int(token_id)}) decodes to {piece!r}")
        if cursor != len(data) and not truncated:
            raise self._refusal(f"the decoded tokens stop at byte {cursor} of {len(data)}")
        return spans

    def _refusal(self, why: str) -> TeacherError:
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        return TeacherError(
            f"tokenizer {name} ({type(self.tokenizer).__name__}) has no offset mapping and its "
            f"decoded tokens do not reproduce the text ({why}), so token byte offsets cannot be "
            "computed; save the teacher with a fast tokenizer (tokenizer.json) or set "
            "storage.cross_tokenizer_fields: false"
        )


def covered_text(text: str, spans: np.ndarray) -> str:
    """The start of ``text`` that the (truncated) tokens cover, to a whole character."""
    if not len(spans):
        return ""
    positions = utf8_positions(text)
    end = int(spans[:, 1].max())
    return text[: int(np.searchsorted(positions, end))]


def _has_byte_level_decoder(tokenizer) -> bool:
    """Whether each character of a token's string stands for one byte (GPT-2's alphabet)."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except (AttributeError, ValueError):
        return False
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)
