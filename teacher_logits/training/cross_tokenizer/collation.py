"""Store records -> a batch for a student with its own tokenizer.

    vocab_map = build_vocab_map(store, student_tokenizer)        # once
    collate_fn = functools.partial(collate_cross_tokenizer, student_tokenizer=tok,
                                   vocab_map=vocab_map, max_length=2048)

The student tokenizes the stored text itself; its tokens and the teacher's are aligned
by byte spans (``alignment.py``). What the teacher said is kept in its own positions
(``teacher_*`` tensors, [B, Lt]); the chunk and pair indices say where it meets the
student's positions. Student position t holds token t and predicts token t+1
(``labels[t]``), as in ``collate``.

A chunk is left out of the distillation terms, and its bytes counted in
``dropped_bytes``, when a token in it has no prediction on one side (the first chunk of
a side that adds no BOS, the student's tokens past ``max_length``), when a token does
not reproduce the stored text's bytes (a tokenizer that normalises or decodes lossily:
``round_trip``), or (chunk loss only) when it is longer than ``max_chunk_bytes``
(``long_chunk``); ``past_end`` counts the bytes after the last boundary both sides have
(the student cropped by ``max_length``). For plain text the kept ``chunk_bytes`` and
these add up to ``text_bytes``. Chat samples train on the bytes of the teacher's trained
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ...errors import TrainingInputError
from ...token_offsets import TokenOffsets, covered_text
from ..collation import IGNORE_INDEX
from .alignment import Tokenization, align
from .vocab import VocabMap

FIELDS = ("text", "token_offsets", "target_logprob")
DROP_REASONS = ("no_prediction", "round_trip", "long_chunk", "past_end")
OLD_STORE = (
    "was written without the cross-tokenizer fields (text, token_offsets, "
    "target_logprob); generate the store again with the current workflow and "
    "storage.cross_tokenizer_fields: true (the default), adding --config "
    "force_regenerate=true so finished shards are rewritten with them"
)


@dataclass
class _Aligned:
    """One sample: the student's tokens and what each chunk and pair is made of."""

    student_ids: np.ndarray
    labels: np.ndarray
    student_row_chunk: np.ndarray  # chunk of the token each row predicts (local ids)
    teacher_row_chunk: np.ndarray
    chunk_bytes: np.ndarray  # of the chunks kept for the chunk loss
    pair_rows: np.ndarray  # int64 [P, 2]: (teacher row, student row)
    dropped: dict
    text_bytes: int


def collate_cross_tokenizer(
    records: list[dict],
    student_tokenizer,
    vocab_map: VocabMap,
    *,
    max_length: int | None = None,
    max_chunk_bytes: int = 128,
    add_special_tokens: bool = True,
) -> dict:
    """Tokenize each record's text with ``student_tokenizer`` (a fast tokenizer) and align.

    Returns torch tensors. Student side: ``input_ids``, ``attention_mask``, ``labels``
    [B, L] (``labels[t] = input_ids[t+1]``, -100 at padding, the last token and chat
    bytes not trained). Teacher side, in its own positions: ``teacher_target_logprob``
    float32 [B, Lt], ``teacher_topk_ids`` (teacher ids) and ``teacher_topk_logprobs``
    [B, Lt, k], ``teacher_logsumexp_t`` {T: [B, Lt]}, and ``teacher_topk_student_ids``
    [B, Lt, k]: each top-k id's student id with the same bytes, -1 for none.
    Chunk loss: ``student_row_chunk`` [B, L] and ``teacher_row_chunk`` [B, Lt], the chunk
    (numbered across the batch, -1: none) of the token each row predicts, and
    ``chunk_bytes`` [C]. Distribution loss: ``pair_index`` int64 [P, 3] (sample, teacher
    row, student row) where both predict a next token starting at the same byte.
    ``text_bytes`` [B] and ``dropped_bytes`` {reason: [B]} say how much was aligned.

    ``max_length`` keeps the student's first tokens; ``add_special_tokens`` is passed to
    the tokenizer (False for chat text whose template already holds its specials)."""
    if not isinstance(records, (list, tuple)) or not records:
        raise TrainingInputError("collate_cross_tokenizer needs a non-empty list of records")
    if not getattr(student_tokenizer, "is_fast", False):
        raise TrainingInputError(
            f"collate_cross_tokenizer: the student tokenizer {type(student_tokenizer).__name__} "
            "has no offset mapping (a slow tokenizer); load a fast one "
            "(AutoTokenizer.from_pretrained(path, use_fast=True), or a tokenizer.json)"
        )
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise TrainingInputError(
            f"collate_cross_tokenizer: max_length={max_length!r}; use an integer >= 2 or None"
        )
    texts = [covered_text(_text_of(r), _teacher_spans(r)) for r in records]
    encoded = student_tokenizer(
        texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True
    )
    offsets = _offsets_helper(student_tokenizer, len(student_tokenizer))
    samples = []
    for record, text, ids, chars in zip(
        records, texts, encoded["input_ids"], encoded["offset_mapping"]
    ):
        ids = np.asarray(ids, dtype=np.int64)[:max_length]
        spans = offsets.from_char_offsets(text, ids, np.asarray(chars)[: len(ids)])
        samples.append(_align_sample(record, ids, spans, vocab_map, max_chunk_bytes))
    pad_id = student_tokenizer.pad_token_id
    return _batch(records, samples, vocab_map, 0 if pad_id is None else int(pad_id))


@lru_cache(maxsize=4)
def _offsets_helper(tokenizer, size: int) -> TokenOffsets:
    """One per tokenizer and size (tokens added to it since make a new one)."""
    return TokenOffsets(tokenizer)


def _text_of(record: dict) -> str:
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise TrainingInputError(
            f"sample {record.get('sample_id')} has no {', '.join(missing)}: the store {OLD_STORE}"
        )
    return str(record["text"])


def _teacher_spans(record: dict) -> np.ndarray:
    spans = np.asarray(record["token_offsets"], dtype=np.int64).reshape(-1, 2)
    size = len(str(record["text"]).encode("utf-8"))
    rows = len(record["input_ids"])
    if len(spans) != rows or len(record["target_logprob"]) != rows:
        raise _corrupt(record, f"{len(spans)} token spans and {rows} tokens")
    if len(spans) and (spans.min() < 0 or spans.max() > size or (spans[:, 1] < spans[:, 0]).any()):
        raise _corrupt(record, f"token spans outside its {size} text bytes")
    return spans


def _corrupt(record: dict, what: str) -> TrainingInputError:
    return TrainingInputError(
        f"sample {record.get('sample_id')} has {what}; the store is damaged: run "
        "teacher-logits verify --deep on it and regenerate the shards it names"
    )


def _align_sample(record, student_ids, student_spans, vocab_map, max_chunk_bytes) -> _Aligned:
    data = str(record["text"]).encode("utf-8")
    teacher_ids = np.asarray(record["input_ids"], dtype=np.int64)
    teacher_spans = _without_dummy_prefix(
        _teacher_spans(record), teacher_ids, vocab_map.teacher_bytes, data
    )
    student_spans = _without_dummy_prefix(student_spans, student_ids, vocab_map.student_bytes, data)
    alignment = align(teacher_spans, student_spans)
    n_t, n_s = len(teacher_ids), len(student_ids)

    # A token can be scored only through the row before it.
    target = np.asarray(record["target_logprob"], dtype=np.float64)
    teacher_scored = np.zeros(n_t, dtype=bool)
    teacher_scored[1:] = np.isfinite(target[:-1])
    if "row_stored" in record:
        teacher_scored[1:] &= np.asarray(record["row_stored"])[:-1] != 0
    student_scored = np.arange(n_s) >= 1
    trained = (np.asarray(record["loss_mask"]) != 0) if "loss_mask" in record else None
    teacher_matches = _round_trips(
        data, Tokenization.of(teacher_spans), teacher_ids, vocab_map.teacher_bytes
    )
    student_matches = _round_trips(
        data, Tokenization.of(student_spans), student_ids, vocab_map.student_bytes
    )

    chunks = alignment.num_chunks

    def any_in_chunk(flags: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        member = chunk >= 0
        return np.bincount(chunk[member], weights=flags[member], minlength=chunks) > 0

    untrained = (
        any_in_chunk(~trained, alignment.teacher_chunk)
        if trained is not None
        else np.zeros(chunks, bool)
    )
    unscored = any_in_chunk(~teacher_scored, alignment.teacher_chunk) | any_in_chunk(
        ~student_scored, alignment.student_chunk
    )
    mismatched = any_in_chunk(~teacher_matches, alignment.teacher_chunk) | any_in_chunk(
        ~student_matches, alignment.student_chunk
    )
    sizes = alignment.chunk_bytes
    usable = ~untrained & ~unscored & ~mismatched
    kept = usable & (sizes <= max_chunk_bytes)
    dropped = {
        "no_prediction": int(sizes[~untrained & unscored].sum()),
        "round_trip": int(sizes[~untrained & ~unscored & mismatched].sum()),
        "long_chunk": int(sizes[usable & ~kept].sum()),
        "past_end": len(data) - int(alignment.bounds[-1]),
    }
    # Local chunk ids of the kept chunks; the rows predicting their tokens point at them.
    renumber = np.where(kept, np.cumsum(kept) - 1, -1)
    pair_chunks = np.flatnonzero(usable)
    return _Aligned(
        student_ids=student_ids,
        labels=_student_labels(student_ids, student_spans, teacher_spans, trained),
        student_row_chunk=_row_chunks(alignment.student_chunk, renumber),
        teacher_row_chunk=_row_chunks(alignment.teacher_chunk, renumber),
        chunk_bytes=sizes[kept],
        pair_rows=np.stack(
            [alignment.teacher_first[pair_chunks] - 1, alignment.student_first[pair_chunks] - 1],
            axis=1,
        ).reshape(-1, 2),
        dropped=dropped,
        text_bytes=len(data),
    )


def _without_dummy_prefix(spans, ids, table: tuple, data: bytes) -> np.ndarray:
    """SentencePiece's dummy prefix as a token of its own ("▁" before a text that does not
    start with a space, its span overlapping the next token's): a token without text."""
    has_text = np.flatnonzero(spans[:, 1] > spans[:, 0])
    if not len(has_text) or data.startswith(b" "):
        return spans
    first = has_text[0]
    token_id = int(ids[first])
    if token_id < len(table) and table[token_id] == b" ":
        spans = spans.copy()
        spans[first] = spans[first, 0]
    return spans


def _row_chunks(token_chunk: np.ndarray, renumber: np.ndarray) -> np.ndarray:
    """Row t predicts token t+1: the chunk of the next token, in kept-chunk numbers."""
    rows = np.full(len(token_chunk), -1, dtype=np.int64)
    if len(token_chunk) > 1:
        following = token_chunk[1:]
        rows[:-1] = np.where(following >= 0, renumber[np.maximum(following, 0)], -1)
    return rows


def _round_trips(data: bytes, side: Tokenization, ids: np.ndarray, table: tuple) -> np.ndarray:
    """Whether each token's bytes are the text's bytes it owns (True where not known)."""
    matches = np.ones(len(ids), dtype=bool)
    for i in np.flatnonzero(side.owner):
        token_id = int(ids[i])
        piece = table[token_id] if token_id < len(table) else None
        if piece is None:
            continue
        start, end = int(side.owned_start[i]), int(side.owned_end[i])
        text = data[start:end]
        # SentencePiece's dummy prefix: a leading space the text never had.
        matches[i] = piece == text or (start == 0 and piece == b" " + text)
    return matches


def _student_labels(ids, student_spans, teacher_spans, trained) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = ids[1:]
    if trained is None or len(ids) < 2:
        return labels
    teacher, student = Tokenization.of(teacher_spans), Tokenization.of(student_spans)
    owners = np.flatnonzero(teacher.owner)
    if not len(owners):
        labels[:] = IGNORE_INDEX
        return labels
    # A student token is trained when the teacher token owning its first byte is (for a
    # token without text, the byte before it).
    first_byte = np.where(student.has_text, student.owned_start, student.spans[:, 0] - 1)
    at = np.searchsorted(teacher.owned_end[owners], np.maximum(first_byte, 0), side="right")
    token_trained = trained[owners[np.minimum(at, len(owners) - 1)]]
    labels[:-1][~token_trained[1:]] = IGNORE_INDEX
    return labels


def _batch(records, samples: list[_Aligned], vocab_map: VocabMap, pad_id: int) -> dict:
    rows, width = len(samples), max(len(s.student_ids) for s in samples)
    teacher_width = max(len(r["input_ids"]) for r in records)
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=bool)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    student_row_chunk = np.full((rows, width), -1, dtype=np.int64)
    teacher_row_chunk = np.full((rows, teacher_width), -1, dtype=np.int64)
    teacher = _TeacherRows(records, teacher_width, vocab_map)
    pairs, chunk_bytes, first_chunk = [], [], 0
    for b, sample in enumerate(samples):
        n = len(sample.student_ids)
        input_ids[b, :n] = sample.student_ids
        attention_mask[b, :n] = True
        labels[b, :n] = sample.labels
        shift = np.where(sample.student_row_chunk >= 0, first_chunk, 0)
        student_row_chunk[b, :n] = sample.student_row_chunk + shift
        shift = np.where(sample.teacher_row_chunk >= 0, first_chunk, 0)
        teacher_row_chunk[b, : len(shift)] = sample.teacher_row_chunk + shift
        first_chunk += len(sample.chunk_bytes)
        chunk_bytes.append(sample.chunk_bytes)
        pairs.append(np.concatenate([np.full((len(sample.pair_rows), 1), b), sample.pair_rows], 1))
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "student_row_chunk": student_row_chunk,
        "teacher_row_chunk": teacher_row_chunk,
        "chunk_bytes": np.concatenate(chunk_bytes).astype(np.int64),
        "pair_index": np.concatenate(pairs).astype(np.int64).reshape(-1, 3),
        "text_bytes": np.array([s.text_bytes for s in samples], dtype=np.int64),
        **teacher.arrays,
    }
    batch = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in tensors.items()}
    batch["teacher_logsumexp_t"] = {t: torch.from_numpy(v) for t, v in teacher.logsumexp_t.items()}
    batch["dropped_bytes"] = {
        reason: torch.tensor([s.dropped[reason] for s in samples], dtype=torch.int64)
        for reason in DROP_REASONS
    }
    batch["sample_id"] = torch.tensor([int(r["sample_id"]) for r in records], dtype=torch.int64)
    return batch


class _TeacherRows:
    """The teacher's rows of the batch, padded to the longest sample (zeros beyond)."""

    def __init__(self, records, width: int, vocab_map: VocabMap):
        top_k = min(
            (
                np.asarray(r["topk_ids"]).reshape(len(r["input_ids"]), -1).shape[1]
                if "topk_ids" in r
                else 0
            )
            for r in records
        )
        rows = len(records)
        target = np.zeros((rows, width), dtype=np.float32)
        topk_ids = np.zeros((rows, width, top_k), dtype=np.int64)
        topk_logprobs = np.zeros((rows, width, top_k), dtype=np.float32)
        temperatures = set.intersection(
            *[set(map(float, (r.get("logsumexp_t") or {1.0: None}))) for r in records]
        )
        self.logsumexp_t = {t: np.zeros((rows, width), dtype=np.float32) for t in temperatures}
        for b, record in enumerate(records):
            n = len(record["input_ids"])
            values = np.asarray(record["target_logprob"], dtype=np.float32)
            target[b, :n] = np.where(np.isfinite(values), values, 0.0)
            lse = np.asarray(record["logsumexp"], dtype=np.float32)
            per_t = {float(t): v for t, v in (record.get("logsumexp_t") or {}).items()}
            per_t.setdefault(1.0, lse)
            for t in temperatures:
                self.logsumexp_t[t][b, :n] = np.asarray(per_t[t], dtype=np.float32)
            if top_k:
                topk_ids[b, :n] = np.asarray(record["topk_ids"])[:, :top_k]
                logits = np.asarray(record["topk_logits"], dtype=np.float32)[:, :top_k]
                topk_logprobs[b, :n] = logits - lse[:, None]
        mapping = vocab_map.teacher_to_student
        student_ids = np.where(
            topk_ids < len(mapping), mapping[np.minimum(topk_ids, len(mapping) - 1)], -1
        )
        # Ranks top-p left unused (logit -inf) are no outcome.
        student_ids[np.isneginf(topk_logprobs)] = -1
        self.arrays = {
            "teacher_target_logprob": target,
            "teacher_topk_ids": topk_ids,
            "teacher_topk_logprobs": topk_logprobs,
            "teacher_topk_student_ids": student_ids,
        }
