"""Can this teacher be split across a GPU group, layer by layer? Checked in prepare
(before any GPU work) and again by each tensor-parallel generate job (gpus_per_model
may have changed since). Reads the model's config only; no torch, no weights.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TeacherError

PIPELINE_FIX = "set teacher.parallel: pipeline (layers spread over the group's GPUs)"


def check_teacher_splits(
    teacher_path: Path, ranks: int, top_k: int, trust_remote_code: bool = False
) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    check_tensor_parallel(config, ranks, top_k)


def check_tensor_parallel(model_config, ranks: int, top_k: int) -> None:
    """``teacher.parallel: tensor`` over ``ranks`` GPUs: the model has a tensor-parallel
    plan in transformers, its attention and key/value heads divide by ``ranks``, and
    each rank's slice of the vocabulary holds at least ``top_k`` ids."""
    text = model_config.get_text_config()
    kind = model_config.model_type
    plan = getattr(text, "base_model_tp_plan", None) or getattr(
        model_config, "base_model_tp_plan", None
    )
    if not plan:
        remote = " (remote code)" if getattr(model_config, "auto_map", None) else ""
        raise TeacherError(
            f"teacher.parallel: tensor, but transformers has no tensor-parallel plan for "
            f"'{kind}'{remote} models; {PIPELINE_FIX}"
        )
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    for count, what in ((heads, "attention heads"), (kv_heads, "key/value heads")):
        if count % ranks:
            raise TeacherError(
                f"teacher.parallel: tensor splits every layer over gpus_per_model={ranks} GPUs, "
                f"but the teacher's {count} {what} do not divide by {ranks}; use a "
                f"gpus_per_model that divides {count}, or {PIPELINE_FIX}"
            )
    vocab = int(text.vocab_size)
    if vocab - (ranks - 1) * -(-vocab // ranks) < top_k:
        raise TeacherError(
            f"teacher.parallel: tensor gives each of {ranks} GPUs a slice of the {vocab}-id "
            f"vocabulary, and the last holds fewer than generation.top_k={top_k} ids; "
            f"use fewer GPUs per model, a smaller top_k, or {PIPELINE_FIX}"
        )
