"""Prepare: dataset -> token ids + shard plan, and the teacher checks.

Runs once, before any generation job, so every problem with the data or the
teacher is reported before a GPU is touched.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset_reads import check_unchanged, rows_digests, snapshot
from .disk import disk_full_is_a_user_error, write_text_guarded
from .errors import ConfigError, DataError, GpuConfigError, TeacherError
from .fingerprints import (
    WEIGHT_SUFFIXES,
    recorded_dataset_digest,
    run_config_fingerprint,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from .layout import RunLayout
from .run_inputs import InputSources, current_run_inputs, load_digest_cache, save_digest_cache
from .settings import PrepareSettings
from .shard_plan import Segment
from .store.format import FORMAT_VERSION
from .store.prepared import PreparedWriter
from .tensor_plan import check_tensor_parallel
from .token_offsets import TokenOffsets
from .tokenization import (
    Tokenization,
    add_special_counts,
    brief,
    empty_special_counts,
    load_rows,
    special_token_note,
    tokenize_rows,
)
from .tokenizer_identity import tokenizer_content_fingerprint

log = logging.getLogger("prepare")

# Fewer rows than this per process and starting processes costs more than it saves.
ROWS_PER_PROCESS = 20000


def check_teacher(teacher_path: Path, top_k: int, trust_remote_code: bool, tensor_ranks: int = 1):
    """The teacher folder holds a causal LM and a tokenizer; top_k fits its vocabulary;
    with ``tensor_ranks`` > 1, it splits across that many tensor-parallel ranks."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TeacherError(
            f"teacher.path: cannot read the model config in {teacher_path} ({brief(exc)}); "
            "give a folder that save_pretrained wrote"
        ) from None
    remote_causal = "AutoModelForCausalLM" in (getattr(model_config, "auto_map", None) or {})
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise TeacherError(
            f"teacher.path: {teacher_path} holds a '{model_config.model_type}' model, which is not "
            "a causal language model; give a decoder model that AutoModelForCausalLM loads"
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in teacher_path.iterdir()):
        raise TeacherError(
            f"teacher.path: {teacher_path} has a config but no weights (*.safetensors or *.bin); "
            "save the model with model.save_pretrained into that folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TeacherError(
            f"teacher.path: no usable tokenizer in {teacher_path} ({brief(exc)}); "
            "save the tokenizer beside the model with tokenizer.save_pretrained"
        ) from None
    text_config = model_config.get_text_config()
    vocab_size = int(text_config.vocab_size)
    if top_k > vocab_size:
        raise TeacherError(
            f"generation.top_k={top_k} is larger than the teacher's vocabulary ({vocab_size}); "
            f"use a top_k of at most {vocab_size}"
        )
    if tensor_ranks > 1:
        check_tensor_parallel(model_config, tensor_ranks, top_k)
    return tokenizer, vocab_size


def split_shards(lengths: np.ndarray, num_shards: int) -> np.ndarray:
    """Contiguous sample ranges of about equal token count, none empty."""
    num_samples = len(lengths)
    if num_shards == 0:  # an appended segment of blank rows only
        return np.zeros(1, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    targets = cumulative[-1] * np.arange(num_shards + 1) / num_shards
    bounds = np.searchsorted(cumulative, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, num_samples
    for i in range(1, num_shards):  # every shard keeps at least one sample
        bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), num_samples - (num_shards - i))
    return bounds


def chat_renderer(settings: PrepareSettings, tokenizer):
    """The chat renderer for ``dataset.messages_field`` data; ``None`` for plain text."""
    if not settings.chat:
        return None
    from .chat import ChatRenderer, stop_token_ids, template_text

    return ChatRenderer(
        tokenizer,
        template_text(tokenizer, settings.chat_template),
        list(settings.train_roles),
        stop_token_ids(tokenizer, settings.teacher.path),
    )


def check_cuda(settings: PrepareSettings) -> None:
    """GPUs named but no CUDA here: say so now, before any shard job starts."""
    plan = settings.devices
    if plan.mode != "local" or plan.allow_cpu:
        return
    import torch

    if not torch.cuda.is_available():
        gpus = ",".join(str(g) for group in plan.groups for g in group)
        raise GpuConfigError(
            f"gpus={gpus} names GPUs but CUDA sees none on this machine; "
            "run with gpus= (empty) for CPU, or set allow_cpu=true to run the GPU-group "
            "path on CPU"
        )


@dataclass
class Tokenized:
    """What tokenizing the dataset found: the kept samples, their shard split and counts."""

    num_rows: int
    sample_ids: np.ndarray
    offsets: np.ndarray
    shard_bounds: np.ndarray
    dropped: list
    truncated: int
    split: int
    # Tokens with loss_mask 1; None for plain text.
    trained: int | None
    # Samples whose text holds literal special-token strings ("</s>"), and how many.
    special_token_strings: dict | None = None


def prepare(settings: PrepareSettings, layout: RunLayout, segment: Segment | None = None) -> None:
    """Tokenize the rows of ``segment`` (default: a first plan of the whole dataset) into
    its tokens file and plan its shards in its ``plan.json``."""
    if segment is None:
        segment = Segment(0, 0, None, 0, settings.num_shards, settings.max_samples)
    check_cuda(settings)
    tokenizer, vocab_size = check_teacher(
        settings.teacher.path,
        settings.top_k,
        settings.teacher.trust_remote_code,
        tensor_ranks=settings.tensor_ranks,
    )
    # Every later run compares these with its own inputs (run_inputs, shard_plan).
    cache = load_digest_cache(layout)
    before = dict(cache)
    # Each file's size, hash and rows from one read: what is tokenized is what is hashed.
    reads = [snapshot(Path(path), cache) for path in settings.dataset_paths]
    files = [record for record, _ in reads]
    inputs = current_run_inputs(InputSources.from_prepare_settings(settings), layout, cache)
    if segment.index == 0 and segment.end_row is None:
        # A plan made from scratch: segments of an earlier plan no longer continue it.
        for stale in layout.prepared_dir.glob("segment_*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(layout.segment_records_dir, ignore_errors=True)
    # tokens.h5 reports a full disk itself; what is left is the datasets library's cache.
    with disk_full_is_a_user_error(datasets_cache(), fix=CACHE_FIX):
        tokenized = tokenize_dataset(settings, tokenizer, layout, segment, reads)
    plan = shard_plan(settings, vocab_size, tokenized, segment)
    span = (segment.first_row, segment.first_row + tokenized.num_rows)
    paths = settings.dataset_paths
    # Every later plan compares it: an edit to these rows prepares this segment again.
    plan["rows_digest"] = rows_digests(paths, [span], settings.split, cache, files)[span]
    for path, (record, key) in zip(paths, reads):
        check_unchanged(Path(path), record, key, cache)  # rows appended meanwhile: next run's
    save_digest_cache(layout, cache, before)
    inputs["dataset_digest"] = recorded_dataset_digest(files)
    plan["dataset_files"] = files
    # Every shard's job checks the teacher it loads against these.
    plan["teacher_content_digest"] = inputs["teacher_content_digest"]
    plan["run_inputs"] = inputs
    # What the tokenizer does, not its files' bytes: a student's check_tokenizer compares it.
    plan["tokenizer_content_fingerprint"] = tokenizer_content_fingerprint(tokenizer)
    text = json.dumps(plan, indent=1)
    layout.segment_records_dir.mkdir(parents=True, exist_ok=True)
    write_text_guarded(layout.segment_record(segment.index), text)
    write_text_guarded(layout.segment_plan(segment.index), text)
    log.info(
        "prepared %d samples, %d tokens (%d truncated to %d, %d longer kept whole, %d dropped) "
        "in %d shards (%s)",
        len(tokenized.sample_ids),
        tokenized.offsets[-1],
        tokenized.truncated,
        settings.max_length,
        tokenized.split,
        len(tokenized.dropped),
        segment.num_shards,
        f"rows {plan['segment']['first_row']}-{plan['segment']['end_row'] - 1}, shards "
        f"{segment.first_shard}-{segment.shards.stop - 1}",
    )
    if tokenized.trained is not None:
        log.info("loss mask: %d of %d tokens trained on", tokenized.trained, tokenized.offsets[-1])


def tokenize_dataset(
    settings: PrepareSettings, tokenizer, layout: RunLayout, segment: Segment, reads: list
) -> Tokenized:
    """Stream the segment's rows through the tokenizer into its tokens file (atomically);
    records each file's row count in its snapshot record (``reads``)."""
    chat = chat_renderer(settings, tokenizer)
    key = "dataset.messages_field" if chat else "dataset.text_field"
    column = settings.messages_field if chat else settings.text_field
    data, per_file = load_rows(settings.dataset_paths, settings.split, column, key, reads)
    for (record, _), rows in zip(reads, per_file):
        record["rows"] = rows
    if len(data) == 0:
        raise DataError(f"dataset.path: {describe(settings)} has no rows; give a dataset with text")
    end = len(data) if settings.max_samples is None else min(settings.max_samples, len(data))
    end = end if segment.end_row is None else min(segment.end_row, len(data))
    if end <= segment.first_row:
        raise DataError(
            f"dataset.path: {describe(settings)} has {len(data)} rows, none from row "
            f"{segment.first_row} on as planned; run the same command again to plan anew"
        )
    data = data.select(range(segment.first_row, end))
    num_rows = len(data)
    processes = max(1, min(settings.threads, -(-num_rows // ROWS_PER_PROCESS)))
    log.info(
        "rows %d-%d of %s (memory-mapped); tokenizing in %d process(es)",
        segment.first_row,
        end - 1,
        describe(settings),
        processes,
    )
    # The text and each token's byte span in it (storage.cross_tokenizer_fields).
    offsets = TokenOffsets(tokenizer) if settings.cross_tokenizer_fields else None
    work = Tokenization(
        tokenizer,
        settings.max_length,
        settings.overflow,
        chat,
        settings.split_special_tokens,
        offsets=offsets,
    )
    writer = PreparedWriter(
        layout.segment_tokens(segment.index), chat is not None, with_text=offsets is not None
    )
    kept_rows, lengths, dropped = [], [], []
    truncated = split = trained = 0
    specials = empty_special_counts()
    source = settings.dataset_paths[0] if len(settings.dataset_paths) == 1 else None
    try:
        rows = tokenize_rows(data, column, work, processes, source, segment.first_row)
        for result in rows:
            writer.append(
                result["input_ids"], result["loss_mask"], result["token_offsets"], result["texts"]
            )
            kept_rows.append(result["rows"])
            lengths.append(result["lengths"])
            dropped += result["dropped"]
            truncated += result["truncated"]
            split += result["split"]
            add_special_counts(specials, result["special_token_strings"])
            if result["loss_mask"] is not None:
                trained += int(np.count_nonzero(result["loss_mask"]))
        kept_rows, lengths = np.concatenate(kept_rows), np.concatenate(lengths)
        for entry in dropped:
            log.warning("dropped sample %d: %s", entry["sample_id"], entry["reason"])
        note = special_token_note(specials, settings.split_special_tokens, chat is not None)
        if note:
            log.log(*note)
        check_samples_kept(settings, segment, len(kept_rows), num_rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        bounds = split_shards(lengths, segment.num_shards)
        writer.commit(kept_rows, offsets, bounds)
    except BaseException:
        writer.abort()
        raise
    return Tokenized(num_rows, kept_rows, offsets, bounds, dropped, truncated, split,
                     trained if chat is not None else None, specials)  # fmt: skip


def describe(settings: PrepareSettings) -> str:
    return ", ".join(str(path) for path in settings.dataset_paths)


def check_samples_kept(settings: PrepareSettings, segment: Segment, kept: int, rows: int) -> None:
    if not kept and segment.num_shards == 0 and segment.index > 0:
        return  # appended rows that are all blank, as planned: dropped and listed
    if kept and segment.num_shards == 0:
        raise DataError(
            f"dataset.path: rows {segment.first_row}-{segment.first_row + rows - 1} of "
            f"{describe(settings)} changed since they were planned; run the same command again"
        )
    if not kept:
        raise DataError(
            f"dataset.path: all {rows} rows of {describe(settings)} have empty text; check "
            "that dataset.text_field names the column that holds the text"
        )
    if segment.num_shards > kept and segment.index == 0:
        raise ConfigError(
            f"num_shards={segment.num_shards} is more than the {kept} samples kept; "
            f"use num_shards={kept} or fewer"
        )
    if segment.num_shards > kept:
        raise DataError(
            f"dataset.path: {rows} rows were appended but only {kept} have text, fewer than "
            f"the {segment.num_shards} shards planned for them; append rows with text"
        )


def shard_plan(
    settings: PrepareSettings, vocab_size: int, tokenized: Tokenized, segment: Segment
) -> dict:
    """A segment's ``plan.json``: its rows, its shards' sizes and the fingerprints every
    shard must carry."""
    teacher_fp = teacher_fingerprint(settings.teacher.path)
    tokenizer_fp = tokenizer_fingerprint(settings.teacher.path)
    offsets, bounds = tokenized.offsets, tokenized.shard_bounds
    fingerprint = run_config_fingerprint(
        settings.meaning, teacher_fp, tokenizer_fp, segment.earlier
    )
    plan = {
        "format_version": FORMAT_VERSION,
        # This segment's shards (plan.json of segment 0 counted every shard before appends).
        "num_shards": segment.num_shards,
        "segment": {
            "index": segment.index,
            "first_row": segment.first_row,
            "end_row": segment.first_row + tokenized.num_rows,
            "first_shard": segment.first_shard,
            "num_shards": segment.num_shards,
        },
        "max_samples": settings.max_samples,
        "num_rows": tokenized.num_rows,
        "num_samples": len(tokenized.sample_ids),
        "num_tokens": int(offsets[-1]),
        "truncated_samples": tokenized.truncated,
        # Documents longer than max_length kept whole (overflow: split).
        "split_samples": tokenized.split,
        "max_length": settings.max_length,
        "top_k": settings.top_k,
        "vocab_size": vocab_size,
        "teacher_fingerprint": teacher_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "config_fingerprint": fingerprint,
        "settings": settings.meaning,
        "shards": [
            {
                "index": segment.first_shard + i,
                "num_samples": int(bounds[i + 1] - bounds[i]),
                "num_tokens": int(offsets[bounds[i + 1]] - offsets[bounds[i]]),
            }
            for i in range(segment.num_shards)
        ],
        "dropped": tokenized.dropped,
        # prepare made the texts and token byte spans (storage.cross_tokenizer_fields).
        "cross_tokenizer_fields": settings.cross_tokenizer_fields,
    }
    if tokenized.special_token_strings is not None:
        counts = tokenized.special_token_strings
        plan["special_token_strings"] = {
            "samples": counts["samples"],
            "occurrences": counts["occurrences"],
            "split": settings.split_special_tokens,
            "tokens": dict(sorted(counts["tokens"].items(), key=lambda kv: (-kv[1], kv[0]))),
            "examples": counts["examples"],
        }
    if tokenized.trained is not None:
        plan["loss_mask"] = {
            "ones": tokenized.trained,
            "zeros": int(offsets[-1]) - tokenized.trained,
        }
    return plan


CACHE_FIX = (
    "free space there, or point HF_DATASETS_CACHE at a bigger disk, then rerun the same command"
)


def datasets_cache() -> Path:
    """Where the datasets library converts a dataset file to Arrow (a full disk shows there)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)
