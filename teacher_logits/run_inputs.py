"""What the stored numbers depend on, compared by content on every run.

Snakemake decides what to rerun from file timestamps and its per-folder metadata,
which is keyed by paths as typed. Neither sees a setting changed under another
spelling of ``output_dir`` (or from a fresh ``.snakemake``), weights copied over in
place, or a dataset edited with ``cp -p``. So ``prepare`` records the content
fingerprints of its inputs in the plan, and every run compares them with the
current ones while Snakemake plans (``changes_since_plan``); a difference forces
prepare, and every shard's job then compares its fingerprints and tokens with the
new plan, reusing the shards that still hold and regenerating the others.

Nothing here writes a file but the dataset's hash cache. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import dataset_path, meaning_settings, teacher_path
from .fingerprints import (
    content_digest,
    teacher_content_digest,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from .layout import RunLayout, atomic_write_text

# What a legacy plan (made before plans recorded run_inputs) recorded of its inputs.
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
        "teacher_content_digest": teacher_content_digest(sources.teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(sources.teacher),
        "dataset_digest": content_digest(sources.dataset, cache),
    }
    if cache != before and layout.output_dir.is_dir():
        try:  # only a cache: a dry run on a full or read-only disk goes on without it
            atomic_write_text(layout.digest_cache, json.dumps(cache, indent=1, sort_keys=True))
        except OSError:
            pass
    return inputs


def planned_run_inputs(layout: RunLayout) -> dict | None:
    """What the existing plan was made from: all of it, a legacy plan's part (made before
    plans recorded it), or None without a plan."""
    plan = _read_json(layout.plan)
    if not isinstance(plan, dict):
        return None
    if "run_inputs" in plan:
        return plan["run_inputs"]
    if all(key in plan for key in LEGACY_PLAN_KEYS):
        return {key: plan[key] for key in LEGACY_PLAN_KEYS}
    return None


def changes_since_plan(layout: RunLayout, inputs: dict) -> list[str]:
    """How ``inputs`` differ from what the existing plan was made from, in words (empty:
    the plan still holds, or there is none yet and prepare runs anyway)."""
    planned = planned_run_inputs(layout)
    if planned is None or all(inputs.get(key) == value for key, value in planned.items()):
        return []
    return describe_changes(planned, inputs) or ["the run's inputs changed"]


WHAT_CHANGED = {
    "teacher_fingerprint": "the teacher's config or weights changed",
    "teacher_content_digest": "the teacher's files changed (weights, config, tokenizer or code)",
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
    teacher_said = False
    for key, words in WHAT_CHANGED.items():
        if key in old and old[key] != new.get(key):
            if key.startswith("teacher_") and teacher_said:
                continue
            teacher_said = teacher_said or key.startswith("teacher_")
            changes.append(words)
    return changes
