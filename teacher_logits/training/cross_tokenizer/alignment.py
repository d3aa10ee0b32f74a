"""Teacher and student tokens of one text, aligned by their UTF-8 byte spans (numpy).

A *boundary* of a tokenization is a byte position where one of its tokens ends and the
next begins. The positions where both tokenizations have a boundary cut the text into
*chunks*: chunk c is the bytes ``[bounds[c], bounds[c+1])``, and each token with text lies
in exactly one chunk on its side. Both sides then predict the same bytes in a chunk, and
at a chunk's first byte both predict a next token that starts there.

Spans are read as the store and ``teacher_logits.token_offsets`` write them: a token
added without text (BOS, EOS) has an empty span and lies in no chunk. A token owns the
bytes from where the token before it ended to its own end, so bytes an offset mapping
left out between two tokens (trimmed spaces) belong to the token after them. A token
whose span starts inside the one before it (two tokens of one multi-byte character whose
byte lengths were not known) leaves the place between them unknown: no boundary there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tokenization:
    """One side's tokens as byte ranges."""

    spans: np.ndarray  # int64 [n, 2], as given
    has_text: np.ndarray  # bool [n]: a non-empty span
    owned_start: np.ndarray  # int64 [n]: where the token before it ended
    owned_end: np.ndarray  # int64 [n]: the furthest end so far (this token's, if it owns bytes)
    owner: np.ndarray  # bool [n]: owns at least one byte (owned_start < owned_end)
    boundaries: np.ndarray  # int64, strictly increasing, 0 first

    @classmethod
    def of(cls, spans) -> Tokenization:
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        has_text = spans[:, 1] > spans[:, 0]
        owned_end = (
            np.maximum.accumulate(np.where(has_text, spans[:, 1], 0))
            if len(spans)
            else (np.zeros(0, np.int64))
        )
        owned_start = np.concatenate([[0], owned_end[:-1]]).astype(np.int64)
        owner = has_text & (owned_end > owned_start)
        # Where a token reaching past the one before it started inside it, their true
        # boundary lies somewhere in that character: the claimed one is not trusted.
        unsure = owned_start[owner & (spans[:, 0] < owned_start)]
        boundaries = np.setdiff1d(np.concatenate([[0], owned_end[owner]]), unsure)
        return cls(spans, has_text, owned_start, owned_end, owner, boundaries)

    @property
    def covered(self) -> int:
        """The byte just past the last token's text."""
        return int(self.owned_end[-1]) if len(self.owned_end) else 0


@dataclass(frozen=True)
class Alignment:
    """Chunks shared by a teacher and a student tokenization of the same bytes."""

    bounds: np.ndarray  # int64 [C + 1]: chunk c is bytes [bounds[c], bounds[c + 1])
    teacher_chunk: np.ndarray  # int64 [n_teacher]: each token's chunk, -1 for none
    student_chunk: np.ndarray  # int64 [n_student]
    teacher_first: np.ndarray  # int64 [C]: the teacher token that opens chunk c
    student_first: np.ndarray  # int64 [C]

    @property
    def num_chunks(self) -> int:
        return len(self.bounds) - 1

    @property
    def chunk_bytes(self) -> np.ndarray:
        return np.diff(self.bounds)


def align(teacher_spans, student_spans) -> Alignment:
    """Chunks of the bytes both tokenizations cover, cut where both have a boundary.

    Bytes after the last shared boundary (one side truncated or cropped there) lie in no
    chunk; their tokens get chunk -1, as do tokens without text."""
    teacher, student = Tokenization.of(teacher_spans), Tokenization.of(student_spans)
    bounds = np.intersect1d(teacher.boundaries, student.boundaries)
    return Alignment(
        bounds=bounds,
        teacher_chunk=_chunk_of(teacher, bounds),
        student_chunk=_chunk_of(student, bounds),
        teacher_first=_first_of(teacher, bounds),
        student_first=_first_of(student, bounds),
    )


def _chunk_of(side: Tokenization, bounds: np.ndarray) -> np.ndarray:
    # A token ending at bounds[c + 1] (or inside the chunk) lies in chunk c; one that
    # owns nothing (a second piece of a character) lies where the piece before it does.
    chunk = np.searchsorted(bounds, side.owned_end, side="left") - 1
    inside = side.has_text & (chunk >= 0) & (chunk < len(bounds) - 1)
    return np.where(inside, chunk, -1).astype(np.int64)


def _first_of(side: Tokenization, bounds: np.ndarray) -> np.ndarray:
    owners = np.flatnonzero(side.owner)
    # Owners' starts strictly increase, and every chunk start is one of them.
    at = np.searchsorted(side.owned_start[owners], bounds[:-1])
    return owners[at].astype(np.int64)
