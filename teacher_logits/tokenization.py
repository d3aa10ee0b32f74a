"""Rows of the dataset -> token ids (and loss masks), in one or several processes.

Rows stream from the memory-mapped dataset a batch at a time; a few batches per
process are in flight, so memory stays flat however big the data.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque

import numpy as np

from .errors import DataError

# Rows handed to a tokenizer process at a time: big enough to amortise the hand-over,
# small enough that a few in flight per process keep memory flat.
READ_BATCH_ROWS = 1000


class Tokenization:
    """Rows of the dataset -> token ids (and loss masks), in the parent or a worker process.

    Plain text is tokenized with the tokenizer's defaults; chat rows go through
    ``ChatRenderer``. ``overflow``: ``truncate`` cuts at ``max_length``; ``split``
    keeps the whole document (generate computes it in windows).
    """

    def __init__(self, tokenizer, max_length: int, overflow: str, chat=None):
        self.tokenizer, self.max_length, self.overflow, self.chat = (
            tokenizer,
            max_length,
            overflow,
            chat,
        )
        tokenizer.model_max_length = max(max_length, 1) * 1000  # silence length warnings

    def batch(self, first_row: int, values: list) -> dict:
        """One batch of consecutive rows: kept rows, their tokens, dropped rows, counts."""
        rows, items, dropped = [], [], []
        for offset, value in enumerate(values):
            row = first_row + offset
            reason = self._empty(row, value)
            if reason:
                dropped.append({"sample_id": row, "reason": reason})
            else:
                rows.append(row)
                items.append(value)
        encoded = self._encode(rows, items) if items else []
        kept, id_parts, mask_parts, lengths = [], [], [], []
        truncated = split = 0
        for row, (ids, mask, full_length) in zip(rows, encoded):
            if len(ids) == 0:
                dropped.append({"sample_id": row, "reason": "no tokens after tokenization"})
                continue
            if full_length > self.max_length:
                if self.overflow == "split":
                    split += 1
                else:
                    truncated += 1
                    ids = ids[: self.max_length]
                    mask = None if mask is None else mask[: self.max_length]
            kept.append(row)
            lengths.append(len(ids))
            id_parts.append(ids)
            mask_parts.append(mask)
        return {
            "rows": np.asarray(kept, dtype=np.int64),
            "lengths": np.asarray(lengths, dtype=np.int64),
            "input_ids": np.concatenate(id_parts).astype(np.int32)
            if id_parts
            else np.zeros(0, dtype=np.int32),
            "loss_mask": None
            if self.chat is None
            else (np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8)),
            "dropped": sorted(dropped, key=lambda d: d["sample_id"]),
            "truncated": truncated,
            "split": split,
        }

    def _empty(self, row: int, value) -> str | None:
        """Why a row is dropped (None: keep it); a wrong type is an error."""
        if value is None:  # a null cell: as empty as an empty string
            return "no messages (null)" if self.chat is not None else "text is missing (null)"
        if self.chat is not None:
            return "no messages" if isinstance(value, list) and not value else None
        if not isinstance(value, str):
            raise DataError(
                f"dataset row {row}: text field holds {type(value).__name__}, not a string; "
                "clean the dataset or point dataset.text_field at a text column"
            )
        return None if value.strip() else "empty or whitespace-only text"

    def _encode(self, rows: list, items: list) -> list:
        """(input_ids, loss_mask or None, untruncated length) per item."""
        if self.chat is not None:
            return [(ids, mask, len(ids)) for ids, mask in self.chat.encode(rows, items)]
        encoded = self.tokenizer(items, add_special_tokens=True)["input_ids"]
        full_lengths = [len(ids) for ids in encoded]
        too_long = [i for i, n in enumerate(full_lengths) if n > self.max_length]
        if too_long and self.overflow == "truncate":
            # The tokenizer's own truncation: post-processors (BOS/EOS) stay in place.
            again = self.tokenizer(
                [items[i] for i in too_long],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_length,
            )["input_ids"]
            for i, ids in zip(too_long, again):
                encoded[i] = ids
        return [(np.asarray(ids, dtype=np.int32), None, n) for ids, n in zip(encoded, full_lengths)]


_WORKER: Tokenization | None = None


def _init_worker(work: Tokenization) -> None:
    global _WORKER
    _WORKER = work


def _work_batch(first_row: int, values: list) -> dict:
    return _WORKER.batch(first_row, values)


def tokenize_rows(data, column: str, work: Tokenization, processes: int):
    """Yield ``Tokenization.batch`` results in row order, tokenizing in ``processes`` processes.

    Rows are read from the memory-mapped dataset a batch at a time and only a few
    batches per process are in flight, so memory stays flat however big the data.
    """
    batches = (
        (start, data[start : start + READ_BATCH_ROWS][column])
        for start in range(0, len(data), READ_BATCH_ROWS)
    )
    if processes <= 1:
        for start, values in batches:
            yield work.batch(start, values)
        return
    # Each process tokenizes alone; the Rust thread pool is not inherited across fork.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    context = multiprocessing.get_context("fork")  # workers inherit the loaded tokenizer
    with context.Pool(processes, initializer=_init_worker, initargs=(work,)) as pool:
        pending = deque()
        for start, values in batches:
            pending.append(pool.apply_async(_work_batch, (start, values)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
