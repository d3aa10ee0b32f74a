"""Rule ``prepare``: dataset -> token ids + shard plan, and the teacher checks.

Runs once, before any generation job, so every problem with the data or the
teacher is reported before a GPU is touched.
"""


import json
import logging
import multiprocessing
import os
import sys
from collections import deque
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # Snakemake runs a copy of this file: import from the repository
    sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821

from workflow_scripts.fingerprints import (  # noqa: E402
    WEIGHT_SUFFIXES,
    config_fingerprint,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from workflow_scripts.gpu_groups import groups_from_config  # noqa: E402
from workflow_scripts.job import UserError  # noqa: E402
from workflow_scripts.shard_format import FORMAT_VERSION, PreparedWriter  # noqa: E402
from workflow_scripts.workflow_config import meaning_settings  # noqa: E402

log = logging.getLogger("prepare")

# Rows handed to a tokenizer process at a time: big enough to amortise the hand-over,
# small enough that a few in flight per process keep memory flat.
READ_BATCH_ROWS = 1000
# Fewer rows than this per process and starting processes costs more than it saves.
ROWS_PER_PROCESS = 20000


def _brief(exc: Exception, limit: int = 300) -> str:
    """A library's exception as one short line: the user needs the gist, not a wall."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_column(path: Path, split: str, column: str, max_samples: int | None,
                key: str = "dataset.text_field"):
    """The dataset reduced to ``column``, row order preserved, memory-mapped (never loaded
    whole): ``datasets`` converts files to Arrow once and maps them from disk."""
    import datasets

    datasets.disable_progress_bars()
    # datasets logs a read error itself before raising it: the UserError below says it once.
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(
                        f"dataset.split: {path} has splits {list(loaded)}, not '{split}'; "
                        "set dataset.split to one of them"
                    )
                loaded = loaded[split]
        else:
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
            loaded = datasets.load_dataset(
                builder[path.suffix], data_files=str(path), split="train"
            )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"dataset.path: could not read {path} ({_brief(exc)}); "
            "check that it is valid JSON Lines / JSON / Parquet / Arrow or a save_to_disk folder"
        ) from None
    if column not in loaded.column_names:
        what = "conversations" if key == "dataset.messages_field" else "text"
        raise UserError(
            f"{key}: column '{column}' is not in {path} (columns: "
            f"{loaded.column_names}); set {key} to the column holding the {what}"
        )
    loaded = loaded.select_columns([column])
    if max_samples is not None:
        loaded = loaded.select(range(min(max_samples, len(loaded))))
    if len(loaded) == 0:
        raise UserError(f"dataset.path: {path} has no rows; give a dataset with text in it")
    return loaded


def load_texts(path: Path, split: str, text_field: str, max_samples: int | None) -> list:
    """The ``text_field`` column as a list (small datasets and tests)."""
    return load_column(path, split, text_field, max_samples)[text_field]


def check_teacher(teacher_path: Path, top_k: int, trust_remote_code: bool):
    """The teacher folder holds a causal LM and a tokenizer; top_k fits its vocabulary."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(
            f"teacher.path: cannot read the model config in {teacher_path} ({_brief(exc)}); "
            "give a folder that save_pretrained wrote"
        ) from None
    remote_causal = "AutoModelForCausalLM" in (getattr(model_config, "auto_map", None) or {})
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise UserError(
            f"teacher.path: {teacher_path} holds a '{model_config.model_type}' model, which is not "
            "a causal language model; give a decoder model that AutoModelForCausalLM loads"
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in teacher_path.iterdir()):
        raise UserError(
            f"teacher.path: {teacher_path} has a config but no weights (*.safetensors or *.bin); "
            "save the model with model.save_pretrained into that folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(
            f"teacher.path: no usable tokenizer in {teacher_path} ({_brief(exc)}); "
            "save the tokenizer beside the model with tokenizer.save_pretrained"
        ) from None
    text_config = model_config.get_text_config()
    vocab_size = int(text_config.vocab_size)
    if top_k > vocab_size:
        raise UserError(
            f"generation.top_k={top_k} is larger than the teacher's vocabulary ({vocab_size}); "
            f"use a top_k of at most {vocab_size}"
        )
    return tokenizer, vocab_size


class Tokenization:
    """Rows of the dataset -> token ids (and loss masks), in the parent or a worker process.

    Plain text is tokenized with the tokenizer's defaults; chat rows go through
    ``ChatRenderer``. ``overflow``: ``truncate`` cuts at ``max_length``; ``split``
    keeps the whole document (generate computes it in windows).
    """

    def __init__(self, tokenizer, max_length: int, overflow: str, chat=None):
        self.tokenizer, self.max_length, self.overflow, self.chat = tokenizer, max_length, overflow, chat
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
            "input_ids": np.concatenate(id_parts).astype(np.int32) if id_parts
            else np.zeros(0, dtype=np.int32),
            "loss_mask": None if self.chat is None else (
                np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8)),
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
            raise UserError(
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
                [items[i] for i in too_long], add_special_tokens=True, truncation=True,
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
    batches = ((start, data[start : start + READ_BATCH_ROWS][column])
               for start in range(0, len(data), READ_BATCH_ROWS))
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


def split_shards(lengths: np.ndarray, num_shards: int) -> np.ndarray:
    """Contiguous sample ranges of about equal token count, none empty."""
    num_samples = len(lengths)
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    targets = cumulative[-1] * np.arange(num_shards + 1) / num_shards
    bounds = np.searchsorted(cumulative, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, num_samples
    for i in range(1, num_shards):  # every shard keeps at least one sample
        bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), num_samples - (num_shards - i))
    return bounds


def chat_renderer(config: dict, tokenizer, teacher_path: Path):
    """The chat renderer for ``dataset.messages_field`` data; ``None`` for plain text."""
    ds = config["dataset"]
    if not ds["messages_field"]:
        return None
    from workflow_scripts.chat import ChatRenderer, stop_token_ids, template_text

    return ChatRenderer(
        tokenizer, template_text(tokenizer, ds["chat_template"]), ds["train_roles"],
        stop_token_ids(tokenizer, teacher_path),
    )


def prepare(config: dict, teacher_path: str, dataset_path: str, tokens_out: str, plan_out: str,
            threads: int = 1):
    teacher_path, dataset_path = Path(teacher_path), Path(dataset_path)
    groups = groups_from_config(config["gpus"], config["gpus_per_model"])
    if groups and config["gpu_assignment"] == "local" and not config["allow_cpu"]:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"gpus={config['gpus']} names GPUs but CUDA sees none on this machine; "
                "run with gpus= (empty) for CPU, or set allow_cpu=true to run the GPU-group "
                "path on CPU"
            )

    top_k = int(config["generation"]["top_k"])
    tokenizer, vocab_size = check_teacher(teacher_path, top_k, config["teacher"]["trust_remote_code"])
    ds, tok = config["dataset"], config["tokenize"]
    chat = chat_renderer(config, tokenizer, teacher_path)
    key = "dataset.messages_field" if chat else "dataset.text_field"
    column = ds["messages_field"] if chat else ds["text_field"]
    data = load_column(dataset_path, ds["split"], column, ds["max_samples"], key)
    num_rows = len(data)
    processes = max(1, min(int(threads), -(-num_rows // ROWS_PER_PROCESS)))
    log.info("%d rows in %s (memory-mapped); tokenizing in %d process(es)",
             num_rows, dataset_path, processes)

    max_length = int(tok["max_length"])
    work = Tokenization(tokenizer, max_length, tok["overflow"], chat)
    writer = PreparedWriter(tokens_out, with_loss_mask=chat is not None)
    kept_rows, lengths, dropped = [], [], []
    truncated = split = trained = 0
    try:
        for result in tokenize_rows(data, column, work, processes):
            writer.append(result["input_ids"], result["loss_mask"])
            kept_rows.append(result["rows"])
            lengths.append(result["lengths"])
            dropped += result["dropped"]
            truncated += result["truncated"]
            split += result["split"]
            if result["loss_mask"] is not None:
                trained += int(np.count_nonzero(result["loss_mask"]))
        kept_rows, lengths = np.concatenate(kept_rows), np.concatenate(lengths)
        for entry in dropped:
            log.warning("dropped sample %d: %s", entry["sample_id"], entry["reason"])
        num_shards = int(config["num_shards"])
        if not len(kept_rows):
            raise UserError(
                f"dataset.path: all {num_rows} rows of {dataset_path} have empty text; check that "
                "dataset.text_field names the column that holds the text"
            )
        if num_shards > len(kept_rows):
            raise UserError(
                f"num_shards={num_shards} is more than the {len(kept_rows)} samples kept; "
                f"use num_shards={len(kept_rows)} or fewer"
            )
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        bounds = split_shards(lengths, num_shards)
        writer.commit(kept_rows, offsets, bounds)
    except BaseException:
        writer.abort()
        raise

    settings = meaning_settings(config)
    teacher_fp = teacher_fingerprint(teacher_path)
    tokenizer_fp = tokenizer_fingerprint(teacher_path)
    plan = {
        "format_version": FORMAT_VERSION,
        "num_shards": num_shards,
        "num_rows": num_rows,
        "num_samples": len(kept_rows),
        "num_tokens": int(offsets[-1]),
        "truncated_samples": truncated,
        # Documents longer than max_length kept whole (overflow: split).
        "split_samples": split,
        "max_length": max_length,
        "top_k": top_k,
        "vocab_size": vocab_size,
        "teacher_fingerprint": teacher_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "config_fingerprint": config_fingerprint(settings, teacher_fp, tokenizer_fp, FORMAT_VERSION),
        "settings": settings,
        "shards": [
            {
                "index": i,
                "num_samples": int(bounds[i + 1] - bounds[i]),
                "num_tokens": int(offsets[bounds[i + 1]] - offsets[bounds[i]]),
            }
            for i in range(num_shards)
        ],
        "dropped": dropped,
    }
    if chat is not None:
        plan["loss_mask"] = {"ones": trained, "zeros": int(offsets[-1]) - trained}
    Path(plan_out).write_text(json.dumps(plan, indent=1))
    log.info(
        "prepared %d samples, %d tokens (%d truncated to %d, %d longer kept whole, %d dropped) "
        "in %d shards", len(kept_rows), offsets[-1], truncated, max_length, split, len(dropped),
        num_shards,
    )
    if chat is not None:
        log.info("loss mask: %d of %d tokens trained on", trained, offsets[-1])


if __name__ == "__main__":  # pragma: no cover - executed by Snakemake
    from workflow_scripts.job import run_job

    run_job(
        "prepare",
        snakemake.log[0],  # noqa: F821
        prepare,
        snakemake.config,  # noqa: F821
        snakemake.input.teacher,  # noqa: F821
        snakemake.input.dataset,  # noqa: F821
        snakemake.output.tokens,  # noqa: F821
        snakemake.output.plan,  # noqa: F821
        snakemake.threads,  # noqa: F821
    )
