"""Rows of the dataset -> token ids (and loss masks), in one or several processes.

Rows stream from the memory-mapped dataset a batch at a time; a few batches per
process are in flight, so memory stays flat however big the data.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections import Counter, deque
from functools import partial
from pathlib import Path

import numpy as np

from .dataset_errors import describe_undecodable_row, describe_unreadable
from .errors import ConfigError, DataError
from .token_offsets import covered_text

# Rows handed to a tokenizer process at a time: big enough to amortise the hand-over,
# small enough that a few in flight per process keep memory flat.
READ_BATCH_ROWS = 1000
# Rows named as examples of texts that hold special-token strings.
SPECIAL_EXAMPLES = 5


def brief(exc: Exception, limit: int = 300) -> str:
    """A library's exception as one short line: the user needs the gist, not a wall."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_path(path: Path, split: str, content_digest: str | None = None):
    """One dataset path, every column, row order preserved, memory-mapped (never loaded
    whole): ``datasets`` converts files to Arrow once and maps them from disk."""
    import datasets

    datasets.disable_progress_bars()
    # datasets logs a read error itself before raising it: the DataError below says it once.
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        f"dataset.split: {path} has splits {list(loaded)}, not '{split}'; "
                        "set dataset.split to one of them"
                    )
                loaded = loaded[split]
            return loaded
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
        # datasets keys its Arrow copy of a file by path and mtime: a file edited
        # with its timestamp kept (cp -p, rsync -a) would be read from the old copy.
        # So one cache folder per content (without a digest: convert afresh).
        where = {"download_mode": "force_redownload"}
        if content_digest:
            cache = Path(datasets.config.HF_DATASETS_CACHE) / "by_content" / content_digest
            where = {"cache_dir": str(cache)}
        return datasets.load_dataset(
            builder[path.suffix], data_files=str(path), split="train", **where
        )
    except DataError:
        raise
    except Exception as exc:
        # Only now, on the failure path: find the line that broke it, and say how to fix it.
        located = describe_unreadable(path)
        if located:
            raise DataError(located) from None
        raise DataError(
            f"dataset.path: could not read {path} ({brief(exc)}); "
            "check that it is valid JSON Lines / JSON / Parquet / Arrow or a save_to_disk folder"
        ) from None


def load_rows(paths, split: str, column: str, key: str = "dataset.text_field", reads=None):
    """``column`` of every path in list order, one dataset (sample ids are row numbers
    over the files in that order), and each path's row count. ``reads``: prepare's
    snapshots (``dataset_reads.snapshot``): each file is loaded as its snapshot read it,
    cut to the rows it counted (rows appended since are the next run's)."""
    import datasets

    from .dataset_reads import load_as_read, no_rows

    scratch = Path(datasets.config.HF_DATASETS_CACHE) / "by_content"
    parts = []
    for position, path in enumerate(paths):
        if reads:
            digest = reads[position][0]["sha256"]
            load = partial(load_path, split=split, content_digest=digest)
            loaded = load_as_read(Path(path), reads[position], load, scratch)
        else:
            loaded = load_path(Path(path), split)
        if len(loaded) == 0 and len(paths) > 1:
            raise no_rows(path)
        if column not in loaded.column_names:
            what = "conversations" if key == "dataset.messages_field" else "text"
            raise DataError(
                f"{key}: column '{column}' is not in {path} (columns: "
                f"{loaded.column_names}); set {key} to the column holding the {what}"
            )
        parts.append(loaded.select_columns([column]))
    loaded = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return loaded, [len(part) for part in parts]


def load_column(
    path, split: str, column: str, max_samples: int | None, key: str = "dataset.text_field"
):
    """The dataset (one path or a list) reduced to ``column``, capped at ``max_samples``."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    loaded, _ = load_rows(paths, split, column, key)
    if max_samples is not None:
        loaded = loaded.select(range(min(max_samples, len(loaded))))
    if len(loaded) == 0:
        raise DataError(f"dataset.path: {path} has no rows; give a dataset with text in it")
    return loaded


class Tokenization:
    """Rows of the dataset -> token ids (and loss masks), in the parent or a worker process.

    Plain text is tokenized with the tokenizer's defaults; chat rows go through
    ``ChatRenderer``. ``overflow``: ``truncate`` cuts at ``max_length``; ``split``
    keeps the whole document (generate computes it in windows). Texts (or message
    contents) that literally hold a special token's string (``"</s>"``) are counted;
    ``split_special_tokens`` tokenizes such strings as plain text (plain text only).
    ``offsets`` (a ``token_offsets.TokenOffsets``): each kept sample's text and its tokens'
    byte spans come along (``storage.cross_tokenizer_fields``); a truncated sample keeps
    the start of its text that its tokens cover.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int,
        overflow: str,
        chat=None,
        split_special_tokens=False,
        offsets=None,
    ):
        self.tokenizer, self.max_length, self.overflow, self.chat = (
            tokenizer,
            max_length,
            overflow,
            chat,
        )
        if split_special_tokens and chat is not None:  # refused at plan time, too
            raise ConfigError(
                "tokenize.split_special_tokens is for plain text only, not dataset.messages_field "
                "(the chat template writes special tokens itself); set it to false"
            )
        self.split_special_tokens = bool(split_special_tokens)
        self.offsets = offsets
        tokenizer.model_max_length = max(max_length, 1) * 1000  # silence length warnings
        tokens = special_token_strings(tokenizer)
        self.special = re.compile("|".join(map(re.escape, tokens))) if tokens else None

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
        specials = self._count_special(rows, items)
        kept, id_parts, mask_parts, lengths, texts, span_parts = [], [], [], [], [], []
        truncated = split = 0
        for row, (ids, mask, full_length, text, spans) in zip(rows, encoded):
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
                    if spans is not None:
                        spans = spans[: self.max_length]
                        text = covered_text(text, spans)
            kept.append(row)
            texts.append(text)
            span_parts.append(spans)
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
            "texts": texts if self.offsets is not None else None,
            "token_offsets": None
            if self.offsets is None
            else (np.concatenate(span_parts) if span_parts else np.zeros((0, 2), np.int32)),
            "dropped": sorted(dropped, key=lambda d: d["sample_id"]),
            "truncated": truncated,
            "split": split,
            "special_token_strings": specials,
        }

    def _count_special(self, rows: list, items: list) -> dict:
        """Rows whose text (chat: message contents) holds special-token strings, and how many."""
        counts = empty_special_counts()
        if self.special is None:
            return counts
        found = Counter()
        for row, item in zip(rows, items):
            if self.chat is None:
                hits = self.special.findall(item)
            else:  # a malformed conversation is reported by the renderer, not here
                messages = item if isinstance(item, list) else []
                contents = [m.get("content") for m in messages if isinstance(m, dict)]
                hits = [h for c in contents if isinstance(c, str) for h in self.special.findall(c)]
            if hits:
                counts["samples"] += 1
                counts["occurrences"] += len(hits)
                found.update(hits)
                if len(counts["examples"]) < SPECIAL_EXAMPLES:
                    counts["examples"].append(row)
        counts["tokens"] = dict(found)
        return counts

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
        """(input_ids, loss_mask or None, untruncated length, text, byte spans or None) per
        item; a truncated item's spans are cut with its ids."""
        if self.chat is not None:
            return [
                (ids, mask, len(ids), text, self._spans(text, ids, chars))
                for ids, mask, text, chars in self.chat.encode(rows, items)
            ]
        split = {"split_special_tokens": True} if self.split_special_tokens else {}
        with_chars = self.offsets is not None and self.offsets.fast
        found = self.tokenizer(
            items, add_special_tokens=True, return_offsets_mapping=with_chars, **split
        )
        encoded = found["input_ids"]
        chars = found["offset_mapping"] if with_chars else [None] * len(items)
        full_lengths = [len(ids) for ids in encoded]
        too_long = [i for i, n in enumerate(full_lengths) if n > self.max_length]
        if too_long and self.overflow == "truncate":
            # The tokenizer's own truncation: post-processors (BOS/EOS) stay in place.
            again = self.tokenizer(
                [items[i] for i in too_long],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_length,
                return_offsets_mapping=with_chars,
                **split,
            )
            for position, i in enumerate(too_long):
                encoded[i] = again["input_ids"][position]
                if with_chars:
                    chars[i] = again["offset_mapping"][position]
        return [
            (
                np.asarray(ids, dtype=np.int32),
                None,
                n,
                text,
                self._spans(text, ids, c, n > len(ids)),
            )
            for ids, n, text, c in zip(encoded, full_lengths, items, chars)
        ]

    def _spans(self, text: str, ids, chars, truncated: bool = False):
        """int32 [n, 2] byte spans of the tokens in ``text`` (None: not stored)."""
        if self.offsets is None:
            return None
        if chars is None:
            return self.offsets.by_decoding(text, ids, truncated)
        return self.offsets.from_char_offsets(text, ids, chars)


def special_token_strings(tokenizer) -> list[str]:
    """The strings of the tokenizer's special tokens (and added tokens marked special),
    longest first, so a regex alternation prefers the longest match."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            tokens.add(str(token.content))
    return sorted((t for t in tokens if t), key=lambda t: (-len(t), t))


def empty_special_counts() -> dict:
    return {"samples": 0, "occurrences": 0, "tokens": {}, "examples": []}


def add_special_counts(total: dict, part: dict) -> None:
    """Add one batch's ``special_token_strings`` counts to ``total`` (batches in row order)."""
    total["samples"] += part["samples"]
    total["occurrences"] += part["occurrences"]
    for token, n in part["tokens"].items():
        total["tokens"][token] = total["tokens"].get(token, 0) + n
    total["examples"] = (total["examples"] + part["examples"])[:SPECIAL_EXAMPLES]


def special_token_note(counts: dict, split: bool, chat: bool) -> tuple[int, str] | None:
    """(log level, message) about texts that hold special-token strings; None if none do."""
    if not counts["samples"]:
        return None
    tokens = ", ".join(
        f"{token!r} x{n}"
        for token, n in sorted(counts["tokens"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    )
    rows = ", ".join(str(r) for r in counts["examples"])
    more = ", ..." if counts["samples"] > len(counts["examples"]) else ""
    found = (
        f"{counts['samples']} samples (rows {rows}{more}) hold {counts['occurrences']} literal "
        f"special-token strings in their {'message contents' if chat else 'text'} ({tokens})"
    )
    if split:
        return logging.INFO, f"{found}; tokenized as plain text (tokenize.split_special_tokens)"
    if chat:
        return logging.WARNING, (
            f"{found}; the tokenizer reads them as control tokens, as it does in the rendered "
            "conversation (tokenize.split_special_tokens is for plain text only); clean the "
            "contents if they are meant as text"
        )
    return logging.WARNING, (
        f"{found}; the tokenizer turns them into control tokens; set "
        "tokenize.split_special_tokens: true to tokenize them as text"
    )


_WORKER: Tokenization | None = None


def _init_worker(work: Tokenization) -> None:
    global _WORKER
    _WORKER = work


def _work_batch(first_row: int, values: list) -> dict:
    return _WORKER.batch(first_row, values)


def _read_rows(data, column: str, start: int, source: Path | None, first_row: int = 0) -> list:
    """Rows ``start`` to ``start + READ_BATCH_ROWS`` of ``column``; a row whose text is not
    UTF-8 (the JSON reader keeps its bytes, decoding them fails here) is a one-line error."""
    stop = min(start + READ_BATCH_ROWS, len(data))
    try:
        return data[start:stop][column]
    except UnicodeDecodeError as exc:
        for at in range(start, stop):  # the failure path only: find the row
            row = first_row + at
            try:
                data[at][column]
            except UnicodeDecodeError as row_exc:
                if source is None:
                    raise DataError(
                        f"dataset row {row}: text is not valid UTF-8 ({row_exc.reason}); "
                        "re-encode the dataset as UTF-8"
                    ) from None
                raise DataError(describe_undecodable_row(source, row, row_exc)) from None
        raise DataError(
            f"dataset rows {start}-{stop - 1}: not valid UTF-8 ({exc.reason}); "
            "re-encode the dataset as UTF-8"
        ) from None


def tokenize_rows(
    data, column: str, work: Tokenization, processes: int, source=None, first_row: int = 0
):
    """Yield ``Tokenization.batch`` results in row order, tokenizing in ``processes`` processes.

    Rows are read from the memory-mapped dataset a batch at a time and only a few
    batches per process are in flight, so memory stays flat however big the data.
    ``source``: the dataset's path, named in errors. ``data`` starts at dataset row
    ``first_row`` (an appended segment): sample ids are dataset rows.
    """
    source = Path(source) if source is not None else None
    batches = (
        (first_row + start, _read_rows(data, column, start, source, first_row))
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
