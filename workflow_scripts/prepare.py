"""Rule ``prepare``: dataset -> token ids + shard plan, and the teacher checks.

Runs once, before any generation job, so every problem with the data or the
teacher is reported before a GPU is touched.
"""


import json
import logging
import sys
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
from workflow_scripts.shard_format import FORMAT_VERSION, PreparedTokens, write_prepared  # noqa: E402
from workflow_scripts.workflow_config import meaning_settings  # noqa: E402

log = logging.getLogger("prepare")

TOKENIZE_BATCH = 1000


def _brief(exc: Exception, limit: int = 300) -> str:
    """A library's exception as one short line: the user needs the gist, not a wall."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_texts(path: Path, split: str, text_field: str, max_samples: int | None) -> list:
    """The ``text_field`` column of the dataset, row order preserved."""
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
    if text_field not in loaded.column_names:
        raise UserError(
            f"dataset.text_field: column '{text_field}' is not in {path} (columns: "
            f"{loaded.column_names}); set dataset.text_field to the column holding the text"
        )
    if max_samples is not None:
        loaded = loaded.select(range(min(max_samples, len(loaded))))
    if len(loaded) == 0:
        raise UserError(f"dataset.path: {path} has no rows; give a dataset with text in it")
    return loaded[text_field]


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


def tokenize(tokenizer, texts: list, max_length: int):
    """Token ids per kept row, ids of the rows kept, dropped rows, truncation count."""

    tokenizer.model_max_length = max(max_length, 1) * 1000  # silence length warnings
    kept_rows, token_lists, dropped = [], [], []
    truncated = 0
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        rows, strings = [], []
        for offset, text in enumerate(batch):
            row = start + offset
            if text is None:  # a null cell: as empty as an empty string
                dropped.append({"sample_id": row, "reason": "text is missing (null)"})
                continue
            if not isinstance(text, str):
                raise UserError(
                    f"dataset row {row}: text field holds {type(text).__name__}, not a string; "
                    "clean the dataset or point dataset.text_field at a text column"
                )
            if not text.strip():
                dropped.append({"sample_id": row, "reason": "empty or whitespace-only text"})
                continue
            rows.append(row)
            strings.append(text)
        if not strings:
            continue
        encoded = tokenizer(strings, add_special_tokens=True)["input_ids"]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
        if too_long:
            truncated += len(too_long)
            again = tokenizer(
                [strings[i] for i in too_long],
                add_special_tokens=True,
                truncation=True,
                max_length=max_length,
            )["input_ids"]
            for i, ids in zip(too_long, again):
                encoded[i] = ids
        for row, ids in zip(rows, encoded):
            if len(ids) == 0:
                dropped.append({"sample_id": row, "reason": "no tokens after tokenization"})
                continue
            kept_rows.append(row)
            token_lists.append(ids)
    return kept_rows, token_lists, dropped, truncated


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


def prepare(config: dict, teacher_path: str, dataset_path: str, tokens_out: str, plan_out: str):
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
    ds = config["dataset"]
    texts = load_texts(dataset_path, ds["split"], ds["text_field"], ds["max_samples"])
    log.info("loaded %d rows from %s", len(texts), dataset_path)

    max_length = int(config["tokenize"]["max_length"])
    kept_rows, token_lists, dropped, truncated = tokenize(tokenizer, texts, max_length)
    for entry in dropped:
        log.warning("dropped sample %d: %s", entry["sample_id"], entry["reason"])
    num_shards = int(config["num_shards"])
    if not kept_rows:
        raise UserError(
            f"dataset.path: all {len(texts)} rows of {dataset_path} have empty text; check that "
            "dataset.text_field names the column that holds the text"
        )
    if num_shards > len(kept_rows):
        raise UserError(
            f"num_shards={num_shards} is more than the {len(kept_rows)} samples kept; "
            f"use num_shards={len(kept_rows)} or fewer"
        )

    lengths = np.array([len(ids) for ids in token_lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bounds = split_shards(lengths, num_shards)
    prepared = PreparedTokens(
        sample_ids=np.asarray(kept_rows, dtype=np.int64),
        offsets=offsets,
        input_ids=np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32, count=int(offsets[-1])),
        shard_bounds=bounds,
    )
    Path(tokens_out).parent.mkdir(parents=True, exist_ok=True)
    write_prepared(tokens_out, prepared)

    settings = meaning_settings(config)
    teacher_fp = teacher_fingerprint(teacher_path)
    tokenizer_fp = tokenizer_fingerprint(teacher_path)
    plan = {
        "format_version": FORMAT_VERSION,
        "num_shards": num_shards,
        "num_rows": len(texts),
        "num_samples": len(kept_rows),
        "num_tokens": int(offsets[-1]),
        "truncated_samples": truncated,
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
    Path(plan_out).write_text(json.dumps(plan, indent=1))
    log.info(
        "prepared %d samples, %d tokens (%d truncated to %d, %d dropped) in %d shards",
        len(kept_rows), offsets[-1], truncated, max_length, len(dropped), num_shards,
    )


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
    )
