"""The validated config, read once into typed settings for each job.

Rule scripts call ``PrepareSettings.from_config`` / ``GenerateSettings.from_config``
once; library code takes these objects and never reaches into nested config keys.
No torch, no Snakemake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .config import dataset_paths, meaning_settings, teacher_path
from .gpus import DevicePlan, device_plan
from .sampling import SampleSettings
from .temperatures import DEFAULT_TEMPERATURES, normalise_temperatures


@dataclass(frozen=True)
class TeacherSettings:
    path: Path
    dtype: str = "bfloat16"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    max_memory: dict | None = None
    allow_offload: bool = False
    # pipeline | tensor (see generation.engine); the same with one GPU per model.
    parallel: str = "pipeline"

    @classmethod
    def from_config(cls, config: dict) -> TeacherSettings:
        teacher = config["teacher"]
        return cls(
            path=teacher_path(config),
            dtype=teacher["dtype"],
            attn_implementation=teacher["attn_implementation"],
            trust_remote_code=bool(teacher["trust_remote_code"]),
            max_memory=teacher["max_memory"],
            allow_offload=bool(teacher["allow_offload"]),
            parallel=teacher.get("parallel", "pipeline"),
        )

    def resolved(self) -> TeacherSettings:
        """The same settings on the real folder behind ``path`` as it is now: a job that
        fingerprints and loads this path reads one folder, whatever a symlink in ``path``
        points to later."""
        return replace(self, path=Path(os.path.realpath(self.path)))


def tensor_ranks(teacher: TeacherSettings, devices: DevicePlan) -> int:
    """Ranks of a tensor-parallel teacher, or 1 for the pipeline (and with one GPU per
    model, where the two modes are the same)."""
    return devices.gpus_per_model if teacher.parallel == "tensor" else 1


@dataclass(frozen=True)
class PrepareSettings:
    teacher: TeacherSettings
    devices: DevicePlan
    # Read in list order; sample ids are row numbers over them.
    dataset_paths: tuple[Path, ...]
    split: str
    text_field: str
    messages_field: str | None
    chat_template: str | None
    train_roles: tuple[str, ...]
    max_samples: int | None
    max_length: int
    overflow: str
    # Shards of a first plan; appended rows get shards in proportion (shard_plan).
    num_shards: int
    top_k: int
    # What enters config_fingerprint (the settings that change the stored numbers).
    meaning: dict
    threads: int = 1
    # Plain text: special-token strings in it ("</s>") are tokenized as text.
    split_special_tokens: bool = False
    # The text, token byte spans and target_logprob of storage.cross_tokenizer_fields.
    cross_tokenizer_fields: bool = True

    @property
    def chat(self) -> bool:
        return bool(self.messages_field)

    @property
    def tensor_ranks(self) -> int:
        return tensor_ranks(self.teacher, self.devices)

    @classmethod
    def from_config(cls, config: dict, threads: int = 1) -> PrepareSettings:
        ds, tok = config["dataset"], config["tokenize"]
        return cls(
            teacher=TeacherSettings.from_config(config),
            devices=device_plan(config),
            dataset_paths=tuple(dataset_paths(config)),
            split=ds["split"],
            text_field=ds["text_field"],
            messages_field=ds["messages_field"],
            chat_template=ds["chat_template"],
            train_roles=tuple(ds["train_roles"]),
            max_samples=ds["max_samples"],
            max_length=int(tok["max_length"]),
            overflow=tok["overflow"],
            num_shards=int(config["num_shards"]),
            top_k=SampleSettings.from_config(config["generation"]).stored_top_k(
                config["generation"]["top_k"]
            ),
            meaning=meaning_settings(config),
            threads=int(threads),
            split_special_tokens=bool(tok["split_special_tokens"]),
            cross_tokenizer_fields=bool(config["storage"].get("cross_tokenizer_fields", True)),
        )


@dataclass(frozen=True)
class GenerateSettings:
    teacher: TeacherSettings
    devices: DevicePlan
    top_k: int
    batch_tokens: int
    store_entropy: bool
    store_masked_only: bool
    commit_every_s: float
    value_dtype: str
    compression: str
    max_length: int
    stride: int
    threads: int = 1
    # Every temperature a logsumexp is stored for, sorted, 1.0 included (its `logsumexp`);
    # the sample temperature too in the sampled modes (the head-plus-tail loss needs it).
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    sampling: SampleSettings = SampleSettings()
    top_p: float | None = None
    cross_tokenizer_fields: bool = True

    @property
    def tensor_ranks(self) -> int:
        return tensor_ranks(self.teacher, self.devices)

    @classmethod
    def from_config(cls, config: dict, threads: int = 1) -> GenerateSettings:
        gen, storage, tok = config["generation"], config["storage"], config["tokenize"]
        sampling = SampleSettings.from_config(gen)
        temperatures = list(gen.get("temperatures") or [1.0])
        if sampling.draws:
            temperatures.append(sampling.temperature)
        return cls(
            teacher=TeacherSettings.from_config(config),
            devices=device_plan(config),
            top_k=sampling.stored_top_k(gen["top_k"]),
            batch_tokens=int(gen["batch_tokens"]),
            store_entropy=bool(gen["store_entropy"]),
            store_masked_only=bool(gen["store_masked_only"]),
            commit_every_s=float(gen["commit_every_s"]),
            value_dtype=storage["value_dtype"],
            compression=storage["compression"],
            max_length=int(tok["max_length"]),
            stride=int(tok["stride"]),
            threads=int(threads),
            temperatures=normalise_temperatures(temperatures),
            sampling=sampling,
            top_p=gen.get("top_p"),
            cross_tokenizer_fields=bool(storage.get("cross_tokenizer_fields", True)),
        )
