"""The shard plan: segments of dataset rows, stored and only ever extended.

Segment 0 is the first plan: rows [0, R0) split into ``num_shards`` shards by token
count, in ``prepared/tokens.h5`` + ``plan.json``. Rows appended later (at the end of a
JSON Lines file, a file added at the end of a ``dataset.path`` list, a larger
``max_samples``) become segment j, with files of its own (``RunLayout.segment_tokens``)
and shards numbered after the last. A generate job reads only its own segment's files,
so an append reruns no old job and leaves every old shard as it is.

``plan_shards`` runs while Snakemake plans (no torch, no tokenizing): it reads the
recorded segments, compares the run's inputs with what each recorded, and adds a
pending segment for appended rows. ``load_plan`` merges the segments into one plan of
the shape ``plan.json`` always had, for gather, status and readers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .dataset_reads import blank_rows, rows_digests
from .json_cache import read_json
from .layout import RunLayout, shard_name
from .run_inputs import DataSources, changes_since, dataset_rows, planned_run_inputs


@dataclass(frozen=True)
class Segment:
    """Rows ``first_row:end_row`` of the dataset, in shards ``first_shard`` onwards."""

    index: int
    first_row: int
    # None: every row the dataset has (capped by max_samples): a first plan, made before
    # the rows are counted.
    end_row: int | None
    first_shard: int
    num_shards: int
    max_samples: int | None = None
    # Dataset files its rows came from, the first of dataset.path (None: not yet planned).
    num_files: int | None = None
    # Of the run's recorded plan (the prepare job deletes its own before it runs): its
    # config_fingerprint and settings, so the run keeps its fingerprint (see
    # fingerprints.run_config_fingerprint).
    earlier: dict | None = None

    @property
    def shards(self) -> range:
        return range(self.first_shard, self.first_shard + self.num_shards)


def segment_of_plan(index: int, plan: dict) -> Segment:
    """The segment a recorded plan describes (a plan from before segments: all of segment 0)."""
    rows = plan.get("segment") or {
        "first_row": 0,
        # Plans written by hand (benchmarks, old tests) may lack num_rows: all kept rows.
        "end_row": plan.get("num_rows", sum(int(e["num_samples"]) for e in plan["shards"])),
        "first_shard": 0,
        "num_shards": plan["num_shards"],
    }
    dataset = plan["settings"].get("dataset") or {}
    max_samples = plan.get("max_samples", dataset.get("max_samples"))
    earlier = {"config_fingerprint": plan["config_fingerprint"], "settings": plan["settings"]}
    return Segment(
        index,
        int(rows["first_row"]),
        int(rows["end_row"]),
        int(rows["first_shard"]),
        int(rows["num_shards"]),
        max_samples,
        len(plan.get("dataset_files") or [None]),
        earlier,
    )


def recorded_plans(layout: RunLayout) -> list[dict]:
    """Every segment's plan, in order; a segment that does not continue the one before
    (left from a plan made again from scratch) ends the list."""
    plans: list[dict] = []
    first_row = first_shard = 0
    while True:
        plan = read_json(layout.segment_plan(len(plans)))
        if not isinstance(plan, dict) or "shards" not in plan:
            # Deleted by Snakemake while its segment is prepared again (or after that
            # failed): the record prepare kept beside it.
            plan = read_json(layout.segment_record(len(plans)))
        if not isinstance(plan, dict) or "shards" not in plan:
            return plans
        segment = segment_of_plan(len(plans), plan)
        if (segment.first_row, segment.first_shard) != (first_row, first_shard):
            return plans
        plans.append(plan)
        first_row, first_shard = segment.end_row, segment.shards.stop


@dataclass
class ShardPlan:
    """The segments of this run, those to prepare again, and what to tell the user."""

    layout: RunLayout
    segments: list[Segment]
    outdated: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return self.segments[-1].shards.stop

    def shard_names(self) -> list[str]:
        return [shard_name(i) for i in range(self.num_shards)]

    def segment_of(self, shard: int) -> Segment:
        for segment in self.segments:
            if shard in segment.shards:
                return segment
        raise KeyError(f"shard {shard} is in no segment of the plan")

    def by_wildcard(self, wildcard: str) -> Segment:
        wildcards = [self.layout.segment_wildcard(s.index) for s in self.segments]
        return self.segments[wildcards.index(wildcard)]

    def wildcards(self) -> list[str]:
        return [self.layout.segment_wildcard(s.index) for s in self.segments]

    def dataset_files(self, segment: Segment, paths: list) -> list:
        """The dataset files a segment's prepare job names as input: those its rows came
        from while it stands (adding a file to the list must not rerun it), all of them
        when it is prepared (again)."""
        if segment.num_files is None or segment.index in self.outdated:
            return paths
        return paths[: segment.num_files]


def appended_shards(first: Segment, new_rows: int) -> int:
    """Shards for ``new_rows`` appended rows with text: as many per row as the first plan
    has; none for none (blank rows only: dropped and listed, no shard to compute)."""
    first_rows = max(1, int(first.end_row or 1) - first.first_row)
    return max(min(1, new_rows), min(new_rows, math.ceil(first.num_shards * new_rows / first_rows)))


def plan_shards(
    layout: RunLayout, sources: DataSources, inputs: dict | None, cache: dict, compare=True
) -> ShardPlan:
    """The run's segments: those recorded, plus one for rows appended since.

    ``inputs``: the run's current fingerprints (``current_run_inputs``; None while the
    data does not exist yet). ``compare``: also find the segments to prepare again
    (the head of a run, not a cluster job, which needs the segments only).
    """
    plans = recorded_plans(layout)
    if not plans:
        return ShardPlan(layout, [Segment(0, 0, None, 0, sources.num_shards, sources.max_samples)])
    segments = [segment_of_plan(j, plan) for j, plan in enumerate(plans)]
    plan = ShardPlan(layout, segments)
    if inputs is None:
        return plan
    for segment, recorded in zip(segments, plans if compare else []):
        changes = changes_since(planned_run_inputs(recorded), inputs)
        if changes:
            plan.outdated.add(segment.index)
            if not plan.notes:
                plan.notes += [f"since prepare last ran, {c}: preparing again" for c in changes]
    edited = rows_changed(segments, plans, sources, cache) if compare else []
    if edited:
        plan.outdated.update(edited)
        plan.notes.append(
            f"since prepare last ran, the dataset's content changed (rows of "
            f"{_segment_list(edited)}): preparing {'it' if len(edited) == 1 else 'them'} again; "
            "each shard is kept if its token ids are unchanged"
        )
    last, recorded = segments[-1], plans[-1]
    same_data = planned_run_inputs(recorded).get("dataset_digest") == inputs["dataset_digest"]
    # Rows its prepare job saw (appended after the head planned it) but did not tokenize.
    seen = sum(int(f.get("rows", 0)) for f in recorded.get("dataset_files") or [])
    if sources.max_samples is not None:
        seen = min(seen, sources.max_samples)
    if same_data and last.max_samples == sources.max_samples and seen <= last.end_row:
        return plan  # unchanged data: nothing counted
    changed_from, total = dataset_rows(sources, recorded.get("dataset_files"), cache)
    if sources.max_samples is not None:
        total = min(total, sources.max_samples)
    if total < last.end_row:
        first = Segment(0, 0, None, 0, sources.num_shards, sources.max_samples, None, last.earlier)
        return ShardPlan(
            layout,
            [first],
            {0},
            [
                f"the dataset now gives {total} rows, fewer than the {last.end_row} planned: "
                "planning its shards again from scratch"
            ],
        )
    again = []
    if changed_from is not None and changed_from < last.end_row:
        # Segments that recorded a digest of their rows were compared above, row by row.
        again = [
            s.index
            for s, p in zip(segments, plans)
            if s.end_row > changed_from and "rows_digest" not in p
        ]
    if again:
        plan.outdated.update(again)
        plan.notes.append(
            f"since prepare last ran, the dataset's content changed (rows from {changed_from} "
            f"on): preparing {_segment_list(again)} again; each shard is kept if its token ids "
            "are unchanged"
        )
    if total > last.end_row:
        blank = blank_rows(
            sources.paths, last.end_row, total, sources.column, sources.chat, sources.split, cache
        )
        new = Segment(
            len(segments),
            last.end_row,
            total,
            last.shards.stop,
            appended_shards(segments[0], total - last.end_row - blank),
            sources.max_samples,
            None,
            last.earlier,
        )
        plan.segments.append(new)
        plan.notes.append(
            f"{total - last.end_row} rows appended to the dataset (rows {new.first_row} to "
            f"{total - 1}): preparing them as {_shard_range(new.shards)} (segment {new.index})"
        )
    return plan


def rows_changed(segments: list[Segment], plans: list[dict], sources, cache: dict) -> list[int]:
    """The segments whose rows hold other content now than when they were prepared (by the
    digest each recorded of its rows; a segment prepared before they did is compared by
    ``dataset_rows``). Reads nothing while no dataset file's stat key changed."""
    spans = {
        s.index: (s.first_row, s.end_row) for s, p in zip(segments, plans) if "rows_digest" in p
    }
    if not spans:
        return []
    now = rows_digests(sources.paths, spans.values(), sources.split, cache)
    return [j for j, span in spans.items() if now[span] != plans[j]["rows_digest"]]


def _segment_list(indexes: list[int]) -> str:
    return ("segment " if len(indexes) == 1 else "segments ") + ", ".join(map(str, indexes))


def _shard_range(shards: range) -> str:
    if not shards:
        return "no shard (they are all blank: dropped and listed)"
    if len(shards) == 1:
        return f"new shard {shards.start}"
    return f"new shards {shards.start}-{shards.stop - 1}"


# --- reading the stored plan (gather, status, jobs) ----------------------------------------

SUMMED = ("num_rows", "num_samples", "num_tokens", "truncated_samples", "split_samples")


def load_plan(layout: RunLayout) -> dict:
    """Every segment's plan merged into one of the shape ``plan.json`` always had:
    ``num_shards`` counts every shard, ``shards`` lists them with their global index,
    counts are summed and ``dropped`` concatenated; fingerprints and settings are the run's
    (the last segment's: every segment is prepared again when they change)."""
    plans = recorded_plans(layout)
    if not plans:
        raise FileNotFoundError(f"{layout.plan}: no shard plan (prepare has not run)")
    merged = {**plans[-1]}
    merged.pop("segment", None)
    merged["num_shards"] = sum(len(segment_of_plan(j, p).shards) for j, p in enumerate(plans))
    merged["shards"] = [entry for plan in plans for entry in plan["shards"]]
    merged["dropped"] = [entry for plan in plans for entry in plan.get("dropped", [])]
    for key in SUMMED:
        merged[key] = sum(int(plan.get(key, 0)) for plan in plans)
    if any("loss_mask" in plan for plan in plans):
        merged["loss_mask"] = {
            side: sum(plan.get("loss_mask", {}).get(side, 0) for plan in plans)
            for side in ("ones", "zeros")
        }
    found = [plan["special_token_strings"] for plan in plans if plan.get("special_token_strings")]
    if found:
        merged["special_token_strings"] = _merge_special(found)
    merged["segments"] = len(plans)
    return merged


def _merge_special(found: list[dict]) -> dict:
    tokens: dict[str, int] = {}
    for counts in found:
        for token, n in counts["tokens"].items():
            tokens[token] = tokens.get(token, 0) + n
    return {
        **found[-1],
        "samples": sum(c["samples"] for c in found),
        "occurrences": sum(c["occurrences"] for c in found),
        "tokens": dict(sorted(tokens.items(), key=lambda kv: (-kv[1], kv[0]))),
        "examples": [row for c in found for row in c["examples"]][:5],
    }


@dataclass(frozen=True)
class JobPlan:
    """What one shard's job reads: its segment's plan (with every shard of the run in
    ``shards`` and ``num_shards``), its segment's tokens file, and its place in it."""

    plan: dict
    tokens: Path
    local_index: int
    # The shard after its segment's last: fixed when the segment was planned.
    segment_end: int


def job_plan(layout: RunLayout, shard: int) -> JobPlan:
    plans = recorded_plans(layout)
    segments = [segment_of_plan(j, plan) for j, plan in enumerate(plans)]
    for segment, plan in zip(segments, plans):
        if shard in segment.shards:
            merged = {
                **plan,
                "num_shards": segments[-1].shards.stop,
                "shards": [entry for p in plans for entry in p["shards"]],
            }
            return JobPlan(
                merged,
                layout.segment_tokens(segment.index),
                shard - segment.first_shard,
                segment.shards.stop,
            )
    raise FileNotFoundError(f"shard {shard} is in no prepared segment of {layout.output_dir}")


def shard_sources(layout: RunLayout) -> list[tuple[Path, int]]:
    """Per shard of the run, in order: its segment's tokens file and its index there.
    Read once for all shards (gather): ``job_plan`` reads every plan per call."""
    sources: list[tuple[Path, int]] = []
    for j, plan in enumerate(recorded_plans(layout)):
        tokens = layout.segment_tokens(j)
        sources += [(tokens, local) for local in range(len(plan["shards"]))]
    return sources


def plan_mtimes(layout: RunLayout) -> list[float]:
    """Per shard, the mtime of its segment's plan: a shard older than it was made before
    its segment was last prepared."""
    mtimes: list[float] = []
    for j, plan in enumerate(recorded_plans(layout)):
        try:
            mtime = layout.segment_plan(j).stat().st_mtime
        except FileNotFoundError:  # being prepared again: none of its shards is done
            mtime = float("inf")
        mtimes += [mtime] * len(plan["shards"])
    return mtimes
