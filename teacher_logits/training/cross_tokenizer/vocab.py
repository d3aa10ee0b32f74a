"""What each token id stands for in bytes, and the teacher -> student map built from it.

Two tokens mean the same next text when they decode to the same bytes, whatever their
spelling in the vocabulary (GPT-2's "Ġword", SentencePiece's "▁word" and a plain
" word" are all b" word"). The map is built once per (teacher, student) pair and is
picklable, so DataLoader workers receive it with the collate function.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...errors import TrainingInputError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


@dataclass(frozen=True)
class VocabMap:
    """``teacher_to_student`` int64 [teacher ids]: the student id with the identical byte
    string, or -1 (no such token, a special token, or bytes the decoder cannot tell).
    Injective: of teacher ids with equal bytes only the lowest maps. ``teacher_bytes`` and
    ``student_bytes``: each id's bytes (None where unknown), which the collate also uses to
    check that the tokens reproduce the stored text."""

    teacher_to_student: np.ndarray
    teacher_bytes: tuple
    student_bytes: tuple

    @property
    def matched(self) -> int:
        return int((self.teacher_to_student >= 0).sum())


def build_vocab_map(teacher, student_tokenizer) -> VocabMap:
    """The map from the teacher's ids to the student's by identical byte strings.

    ``teacher``: the teacher's tokenizer, a folder holding it, or a ``LogitStore`` (whose
    ``tokenizer/`` copy gather made). ``student_tokenizer``: a tokenizer object."""
    teacher_tokenizer = _load_teacher(teacher)
    teacher_bytes, teacher_special = token_bytes(teacher_tokenizer)
    student_bytes, student_special = token_bytes(student_tokenizer)
    student_of: dict[bytes, int] = {}
    for token_id, piece in enumerate(student_bytes):
        if piece and token_id not in student_special:
            student_of.setdefault(piece, token_id)
    mapping = np.full(len(teacher_bytes), -1, dtype=np.int64)
    seen: set[bytes] = set()
    for token_id, piece in enumerate(teacher_bytes):
        if piece and token_id not in teacher_special and piece not in seen:
            seen.add(piece)
            mapping[token_id] = student_of.get(piece, -1)
    return VocabMap(mapping, tuple(teacher_bytes), tuple(student_bytes))


def _load_teacher(teacher):
    if hasattr(teacher, "convert_ids_to_tokens"):
        return teacher
    from transformers import AutoTokenizer

    from ...layout import RunLayout

    folder = RunLayout(teacher.root).tokenizer_dir if hasattr(teacher, "root") else teacher
    if not os.path.isdir(folder):
        raise TrainingInputError(
            f"{folder} holds no teacher tokenizer: pass the teacher's tokenizer (or its folder) "
            "to build_vocab_map, or gather the store again with this workflow to add tokenizer/"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def token_bytes(tokenizer) -> tuple[list, set]:
    """(bytes of every id, or None where the decoder's spelling is not known; the set of
    special ids). Added tokens stand for their content as written in the text."""
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    decode = _piece_decoder(_decoder_types(tokenizer))
    pieces = [None if token is None else decode(token) for token in tokens]
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if token_id < size:
            pieces[token_id] = added.content.encode("utf-8")
            if getattr(added, "special", False):
                special.add(token_id)
    return pieces, special


def _decoder_types(tokenizer) -> set[str]:
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except (AttributeError, ValueError):
        return {"unknown"}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {part.get("type") for part in parts if part}
    if any(part.get("type") == "Replace" and _METASPACE in json.dumps(part) for part in parts):
        types.add("Metaspace")
    return types or {"none"}


def _piece_decoder(types: set[str]):
    if "ByteLevel" in types:
        table = _byte_level_alphabet()

        def byte_level(token: str):
            try:
                return bytes(table[c] for c in token)
            except KeyError:  # not in GPT-2's alphabet: an added token, read as written
                return None

        return byte_level
    if "Metaspace" in types:

        def metaspace(token: str):
            fallback = _BYTE_FALLBACK.fullmatch(token)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            return token.replace(_METASPACE, " ").encode("utf-8")

        return metaspace
    if types == {"none"}:  # no decoder: tokens are their text
        return lambda token: token.encode("utf-8")
    # WordPiece, CTC and the like: the spelling of a piece does not give its bytes.
    return lambda token: None


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, reversed."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    stand_in = dict(zip(printable, printable))
    extra = 0
    for byte in range(256):
        if byte not in stand_in:
            stand_in[byte] = 256 + extra
            extra += 1
    return {chr(char): byte for byte, char in stand_in.items()}
