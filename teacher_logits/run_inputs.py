"""What the stored numbers depend on, compared by content on every run.

Snakemake decides what to rerun from file timestamps and its per-folder metadata,
which is keyed by paths as typed. Neither sees a setting changed under another
spelling of ``output_dir`` (or from a fresh ``.snakemake``), weights copied over in
place, or a dataset edited with ``cp -p``. So each run computes the content
fingerprints of its inputs and keeps them in ``run_inputs.json``, rewritten only
when they change: its new timestamp makes Snakemake prepare again, and every
shard's job then compares its fingerprints and tokens with the new plan, reusing
the shards that still hold and regenerating the others.

Plan time and ``prepare`` both call ``record_run_inputs``. No torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import dataset_path, meaning_settings, teacher_path
from .disk import write_text_guarded
from .fingerprints import content_digest, teacher_fingerprint, tokenizer_fingerprint, weights_digest
from .layout import RunLayout

# What a legacy plan (made before run_inputs.json existed) recorded of its inputs.
LEGACY_PLAN_KEYS = ("settings", "num_shards", "teacher_fingerprint", "tokenizer_fingerprint")


@dataclass(frozen=True)
class InputSources:
    """Where a run's inputs are and the settings that change the stored numbers."""

    meaning: dict
    num_shards: int
    teacher: Path
    dataset: Path

    @classmethod
    def from_config(cls, config: dict) -> InputSources:
        return cls(
            meaning=meaning_settings(config),
            num_shards=int(config["num_shards"]),
            teacher=teacher_path(config),
            dataset=dataset_path(config),
        )

    @classmethod
    def from_prepare_settings(cls, settings) -> InputSources:
        return cls(
            meaning=settings.meaning,
            num_shards=settings.num_shards,
            teacher=Path(settings.teacher.path),
            dataset=Path(settings.dataset_path),
        )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def current_run_inputs(sources: InputSources, layout: RunLayout) -> dict | None:
    """The fingerprints of this run's inputs; None while the teacher or data do not
    exist yet (the demo's are built by the run itself, and prepare records them)."""
    if not (sources.teacher / "config.json").is_file() or not sources.dataset.exists():
        return None
    cache = _read_json(layout.digest_cache) or {}
    before = dict(cache)
    inputs = {
        "settings": sources.meaning,
        "num_shards": sources.num_shards,
        "teacher_fingerprint": teacher_fingerprint(sources.teacher),
        "teacher_weights_digest": weights_digest(sources.teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(sources.teacher),
        "dataset_digest": content_digest(sources.dataset, cache),
    }
    if cache != before:
        layout.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_guarded(layout.digest_cache, json.dumps(cache, indent=1, sort_keys=True))
    return inputs


def _recorded_by_plan(layout: RunLayout) -> dict | None:
    """What the existing plan was made from (all of it, or a legacy plan's part)."""
    plan = _read_json(layout.plan)
    if not isinstance(plan, dict):
        return None
    if "run_inputs" in plan:
        return plan["run_inputs"]
    if all(key in plan for key in LEGACY_PLAN_KEYS):
        return {key: plan[key] for key in LEGACY_PLAN_KEYS}
    return None


def record_run_inputs(layout: RunLayout, inputs: dict) -> list[str]:
    """Rewrite ``run_inputs.json`` if ``inputs`` differ from it; what changed, in words.

    Without the file (a new run, or one made before it existed), an existing plan made
    from the same inputs is adopted: the file is written dated before the plan, so
    nothing reruns.
    """
    recorded = _read_json(layout.run_inputs)
    if recorded == inputs:
        return []
    layout.output_dir.mkdir(parents=True, exist_ok=True)
    if recorded is None:
        planned = _recorded_by_plan(layout)
        if planned is not None and all(inputs.get(k) == v for k, v in planned.items()):
            write_text_guarded(layout.run_inputs, json.dumps(inputs, indent=1, sort_keys=True))
            plan_mtime = layout.plan.stat().st_mtime_ns
            os.utime(layout.run_inputs, ns=(plan_mtime - 10**9, plan_mtime - 10**9))
            return []
        recorded = planned
    write_text_guarded(layout.run_inputs, json.dumps(inputs, indent=1, sort_keys=True))
    return describe_changes(recorded, inputs) if recorded is not None else []


WHAT_CHANGED = {
    "teacher_fingerprint": "the teacher's config or weights changed",
    "teacher_weights_digest": "the teacher's weights changed",
    "tokenizer_fingerprint": "the teacher's tokenizer changed",
    "dataset_digest": "the dataset's content changed",
}


def describe_changes(old: dict, new: dict) -> list[str]:
    changes = []
    old_settings, new_settings = old.get("settings") or {}, new.get("settings") or {}
    for section in sorted(set(old_settings) | set(new_settings)):
        before, after = old_settings.get(section) or {}, new_settings.get(section) or {}
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key} {before.get(key)!r} -> {after.get(key)!r}")
    if "num_shards" in old and old["num_shards"] != new["num_shards"]:
        changes.append(f"num_shards {old['num_shards']} -> {new['num_shards']}")
    weights_said = False
    for key, words in WHAT_CHANGED.items():
        if key in old and old[key] != new.get(key):
            if key.startswith("teacher_") and weights_said:
                continue
            weights_said = weights_said or key.startswith("teacher_")
            changes.append(words)
    return changes
