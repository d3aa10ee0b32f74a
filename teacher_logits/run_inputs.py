"""What the stored numbers depend on, compared by content on every run.

Snakemake decides what to rerun from file timestamps and its per-folder metadata,
which is keyed by paths as typed. Neither sees a setting changed under another
spelling of ``output_dir`` (or from a fresh ``.snakemake``), weights copied over in
place, or a dataset edited with ``cp -p``. So ``prepare`` records the content
fingerprints of its inputs in the plan, and every run compares them with the
current ones while Snakemake plans (``changes_since``); a difference forces
prepare, and every shard's job then compares its fingerprints and tokens with the
new plan, reusing the shards that still hold and regenerating the others. The
dataset is compared file by file (``dataset_rows``), so rows appended at its end
are told from rows changed (``shard_plan``).

Nothing here writes a file but the dataset's hash cache. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import dataset_paths, meaning_settings, teacher_path
from .dataset_reads import no_rows, whole_json
from .fingerprints import (
    content_digest,
    dataset_digest,
    digest_entry_ok,
    grown_from,
    teacher_content_digest,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from .json_cache import load_cache, mapping_of, read_json, save_cache
from .layout import RunLayout
from .sampling import sampled_stand_ins

# What a legacy plan (made before plans recorded run_inputs) recorded of its inputs.
LEGACY_PLAN_KEYS = ("settings", "teacher_fingerprint", "tokenizer_fingerprint")


@dataclass(frozen=True)
class InputSources:
    """Where a run's inputs are and the settings that change the stored numbers."""

    meaning: dict
    teacher: Path
    datasets: tuple[Path, ...]

    @classmethod
    def from_config(cls, config: dict) -> InputSources:
        return cls(
            meaning=meaning_settings(config),
            teacher=teacher_path(config),
            datasets=tuple(dataset_paths(config)),
        )

    @classmethod
    def from_prepare_settings(cls, settings) -> InputSources:
        return cls(
            meaning=settings.meaning,
            teacher=Path(settings.teacher.path),
            datasets=tuple(settings.dataset_paths),
        )


@dataclass(frozen=True)
class DataSources:
    """The dataset's files and what decides how many of its rows are planned."""

    paths: tuple[Path, ...]
    split: str
    max_samples: int | None
    # Shards of a first plan (or one made again from scratch).
    num_shards: int
    # The column prepare reads, and whether it holds conversations: appended rows
    # without text get no shard.
    column: str = "text"
    chat: bool = False

    @classmethod
    def from_config(cls, config: dict) -> DataSources:
        messages = config["dataset"].get("messages_field")
        return cls(
            paths=tuple(dataset_paths(config)),
            split=config["dataset"]["split"],
            max_samples=config["dataset"]["max_samples"],
            num_shards=int(config["num_shards"]),
            column=messages or config["dataset"]["text_field"],
            chat=messages is not None,
        )


def load_digest_cache(layout: RunLayout) -> dict:
    """The dataset's hash cache; empty when there is none or it is damaged (one warning)."""
    return load_cache(layout.digest_cache, mapping_of(digest_entry_ok)) or {}


def save_digest_cache(layout: RunLayout, cache: dict, before: dict) -> None:
    if cache != before and layout.output_dir.is_dir():
        # Only a cache: a dry run on a full or read-only disk goes on without it.
        save_cache(layout.digest_cache, cache)


def data_exists(paths) -> bool:
    return all(Path(p).exists() for p in paths)


def current_run_inputs(
    sources: InputSources, layout: RunLayout, cache: dict | None = None
) -> dict | None:
    """The fingerprints of this run's inputs; None while the teacher or data do not
    exist yet (the demo's are built by the run itself, and prepare records them).
    ``cache``: the dataset's hash cache, when the caller saves it."""
    if not (sources.teacher / "config.json").is_file() or not data_exists(sources.datasets):
        return None
    own = cache is None
    cache = load_digest_cache(layout) if own else cache
    before = dict(cache)
    inputs = {
        "settings": sources.meaning,
        "teacher_fingerprint": teacher_fingerprint(sources.teacher),
        "teacher_content_digest": teacher_content_digest(sources.teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(sources.teacher),
        "dataset_digest": dataset_digest(list(sources.datasets), cache),
    }
    if own:
        save_digest_cache(layout, cache, before)
    return inputs


def dataset_inputs(sources: InputSources, cache: dict) -> dict | None:
    """The dataset's part of ``current_run_inputs``: all a cluster job needs to find the
    segments (the head compares the rest)."""
    if not data_exists(sources.datasets):
        return None
    return {"dataset_digest": dataset_digest(list(sources.datasets), cache)}


def planned_run_inputs(plan: dict | None) -> dict:
    """What a plan was made from: all of it, a legacy plan's part (made before plans
    recorded it), or nothing."""
    if not isinstance(plan, dict):
        return {}
    if "run_inputs" in plan:
        return plan["run_inputs"]
    return {key: plan[key] for key in LEGACY_PLAN_KEYS if key in plan}


def changes_since_plan(layout: RunLayout, inputs: dict) -> list[str]:
    """How ``inputs`` differ from what the existing plan was made from, in words (empty:
    the plan still holds, or there is none yet and prepare runs anyway)."""
    return changes_since(planned_run_inputs(read_json(layout.plan)), inputs)


# Compared by shard_plan, which tells appended rows from changed ones; neither the
# shard count nor max_samples changes a row already planned.
NOT_COMPARED = ("dataset_digest", "num_shards")


def changes_since(planned: dict, inputs: dict) -> list[str]:
    """How ``inputs`` differ from ``planned`` (a plan's run inputs), in words."""
    planned = {k: v for k, v in planned.items() if k not in NOT_COMPARED}
    if "settings" in planned:  # as today's code records them
        planned["settings"] = sampled_stand_ins(without_max_samples(planned["settings"]))
    if all(inputs.get(key) == value for key, value in planned.items()):
        return []
    return describe_changes(planned, inputs) or ["the run's inputs changed"]


def without_max_samples(settings: dict) -> dict:
    """A plan's settings as they are compared today: plans made before appends had
    ``dataset.max_samples`` among them."""
    dataset = {k: v for k, v in (settings.get("dataset") or {}).items() if k != "max_samples"}
    return {**settings, "dataset": dataset} if "dataset" in settings else settings


WHAT_CHANGED = {
    "teacher_fingerprint": "the teacher's config or weights changed",
    "teacher_content_digest": "the teacher's files changed (weights, config, tokenizer or code)",
    "tokenizer_fingerprint": "the teacher's tokenizer changed",
}


def describe_changes(old: dict, new: dict) -> list[str]:
    changes = []
    old_settings, new_settings = old.get("settings") or {}, new.get("settings") or {}
    for section in sorted(set(old_settings) | set(new_settings)):
        before, after = old_settings.get(section) or {}, new_settings.get(section) or {}
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key} {before.get(key)!r} -> {after.get(key)!r}")
    teacher_said = False
    for key, words in WHAT_CHANGED.items():
        if key in old and old[key] != new.get(key):
            if key.startswith("teacher_") and teacher_said:
                continue
            teacher_said = teacher_said or key.startswith("teacher_")
            changes.append(words)
    return changes


# --- rows, counted without tokenizing -------------------------------------------------------


def dataset_rows(
    sources: DataSources, recorded: list[dict] | None, cache: dict
) -> tuple[int | None, int]:
    """(the first row that may have changed since ``recorded`` (a plan's
    ``dataset_files``), or None; the rows the dataset's files hold now).

    A file recorded at the same place in the list with the same content keeps its rows;
    a JSON Lines file that only grew at its end keeps its rows and adds those after;
    anything else (edited, rewritten, reordered, replaced) may have changed from its
    first row on, and its rows are counted again."""
    recorded = recorded or []
    changed_from, rows_before = None, 0
    for position, path in enumerate(sources.paths):
        entry = recorded[position] if position < len(recorded) else None
        if entry is not None and entry["path"] != str(path.resolve()):
            entry = None
            changed_from = rows_before if changed_from is None else changed_from
        if entry is None:
            rows = count_rows(path, sources.split, cache)
        elif _same_content(path, entry, cache):
            rows = int(entry["rows"])
        elif grown_from(path, entry, cache):
            rows = int(entry["rows"]) + tail_rows(path, int(entry["size"]))
            if position < len(recorded) - 1:  # rows inserted before the next file's
                changed_from = _first(changed_from, rows_before + int(entry["rows"]))
        else:
            rows = count_rows(path, sources.split, cache)
            changed_from = _first(changed_from, rows_before)
        rows_before += rows
    if len(sources.paths) < len(recorded):  # files removed at the end: fewer rows
        changed_from = _first(changed_from, rows_before)
    return changed_from, rows_before


def _first(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _same_content(path: Path, entry: dict, cache: dict) -> bool:
    digest = content_digest(path, cache)
    if path.is_file():
        digest = cache[str(path.resolve())]["sha256"]
    return digest == entry["sha256"]


def count_rows(path: Path, split: str, cache: dict) -> int:
    """Rows of one dataset path as prepare loads them: JSON Lines by its non-blank lines,
    Parquet and Arrow from their metadata, others through ``datasets``. Cached by content.
    A path without rows is a ``DataError`` naming it."""
    key = f"rows:{content_digest(path, cache)}:{split}"
    if key not in cache:
        cache[key] = _count_rows(path, split)
    if cache[key] == 0:
        raise no_rows(path)
    return cache[key]


def _count_rows(path: Path, split: str) -> int:
    if path.suffix == ".jsonl":
        return tail_rows(path, 0)
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    if path.suffix == ".arrow":
        import pyarrow

        with pyarrow.memory_map(str(path)) as source:
            try:
                return sum(batch.num_rows for batch in pyarrow.ipc.open_stream(source))
            except pyarrow.ArrowInvalid:
                return pyarrow.ipc.open_file(source).read_all().num_rows
    from .tokenization import load_path  # a JSON array or a save_to_disk folder: rare

    return len(load_path(path, split))


def tail_rows(path: Path, start: int) -> int:
    """Non-blank lines of a JSON Lines file after byte ``start`` (the JSON reader skips
    blank ones), as prepare reads them: a last line without a newline counts only when it
    is whole JSON (not half a row still being written)."""
    rows = 0
    with open(path, "rb") as handle:
        handle.seek(start)
        for line in handle:
            if line.strip() and (line.endswith(b"\n") or whole_json(line)):
                rows += 1
    return rows
