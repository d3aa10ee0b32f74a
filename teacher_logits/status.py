"""Where a run stands: ``python -m teacher_logits.status OUTPUT_DIR``.

Reads only what the jobs leave on disk, so it works while Snakemake runs, after
it crashed, and from another shell: the plan prepare wrote, finished shards, the
lock a working generate job holds on its shard, the progress record it commits,
and the record each job keeps of its own state (``job.run_job``). Needs the
standard library and h5py (for the provenance of finished shards); never
Snakemake or torch.

A shard is
- done: its shard file exists (and is newer than the plan) and passes a quick check
  (it opens, its attributes say this run made it, its datasets have the planned
  shapes; no data is read, and a result is kept until the file changes);
- in progress: a generate job holds the flock on the shard's lock file;
- failed: its file fails the quick check (truncated, unreadable, another run's), or
  it is not running and its job recorded an error;
- pending: anything else (partly done when it has committed progress).

The disk section counts what the rest of the run writes at its peak: the shards
still to make, the uncompressed resume parts of the shards being made (deleted
when each finishes), and gather's index, and warns when that exceeds the free space.

It writes nothing into the output_dir's store (its cache: ``status_checks``), so it
works on a read-only or copied store; one without run state (no ``prepared/``) is
shown as a gathered store with its counts. Every kind also shows who holds the run
lock (``run_lock.holder_info``) and the shards no plan owns any more (``prune``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .disk import free_bytes, gather_bytes, human_bytes, render_disk, run_needs
from .errors import LockError
from .json_cache import read_json
from .layout import RunLayout, job_record_for
from .locks import held_by_another
from .prune import find_orphans, orphans_line
from .run_lock import holder_info
from .run_stats import busy_seconds, duration, group_summary
from .shard_plan import load_plan, plan_mtimes
from .status_checks import check_finished
from .store.identity import shard_list

# Lines of a failed gather's error that status repeats (the first names the shards).
GATHER_ERROR_LINES = 6
# Folders whose lock files flock cannot probe, noted once.
_UNPROBED_DIRS: set[Path] = set()


def lock_held(path: Path) -> bool:
    """Whether a generate job holds the flock on ``path``. Where flock fails there (a mount
    without lock support) nobody can tell: the shard counts as not running, with a note."""
    try:
        return held_by_another(path)
    except LockError as error:
        if path.parent not in _UNPROBED_DIRS:  # one note per folder, not one per shard
            _UNPROBED_DIRS.add(path.parent)
            print(f"note: status cannot see which shards are running: {error}", file=sys.stderr)
        return False


def job_record(log_path: Path) -> dict:
    """The state a job recorded beside its log (empty when it never started)."""
    return read_json(job_record_for(log_path)) or {}


def job_error(log_path: Path, whole: bool = False) -> str | None:
    """The error a failed job recorded, if its last run failed: its first line, or all
    of it (``whole``: gather's first line names the bad shards, the next say why)."""
    record = job_record(log_path)
    if record.get("state") != "failed" or not record.get("error"):
        return None
    return record["error"] if whole else record["error"].splitlines()[0]


def shard_state(layout: RunLayout, entry: dict, plan_mtime: float, checked: dict) -> dict:
    index = int(entry["index"])
    shard_path = layout.shard(index)
    log_path = layout.log("generate", index)
    state = {
        "index": index,
        "num_tokens": int(entry["num_tokens"]),
        "num_samples": int(entry["num_samples"]),
        "rows_done": 0,
        "note": "",
    }
    running = lock_held(layout.shard_lock(index))
    progress = read_json(layout.progress(index))
    if progress:
        state["rows_done"] = int(progress.get("rows_done", 0))
        state["updated_at"] = progress.get("updated_at")

    if shard_path.exists() and not running:
        if shard_path.stat().st_mtime >= plan_mtime:
            found = checked.get(index, {})
            if isinstance(found, str):  # the file fails the quick check
                state.update(
                    state="failed",
                    error=f"{shard_path.name}: {found}; delete it and rerun the same command, "
                    "which regenerates it",
                )
                return state
            state.update(state="done", rows_done=state["num_tokens"], **found)
            return state
        state["note"] = "older than the plan: will be regenerated"
        state["rows_done"] = 0
    if running:
        state["state"] = "in progress"
        state["job_started_at"] = job_record(log_path).get("started_at")
        if not progress:
            state["note"] = "starting (waiting for a GPU group or loading the teacher)"
        return state
    error = job_error(log_path)
    if error:
        state.update(state="failed", error=error)
        return state
    state["state"] = "pending"
    if progress and state["rows_done"]:
        state["note"] = "interrupted; resumes from its committed rows"
    elif log_path.exists() and not state["note"]:
        state["note"] = "interrupted"
    return state


def gathered_store(layout: RunLayout) -> dict | None:
    """A store with no run state (copied, or its run's files removed): its counts from
    ``manifest.json`` and the shards that fail a quick check; None when there is no
    readable manifest."""
    manifest = read_json(layout.manifest)
    try:
        indexes = [int(entry["index"]) for entry in manifest["shards"]]
        checked = check_finished(layout, manifest, indexes)
    except (TypeError, KeyError, ValueError):
        return None
    return {
        "index": layout.index.is_file(),
        "num_shards": len(indexes),
        "num_samples": manifest.get("num_samples"),
        "num_tokens": manifest.get("num_tokens"),
        "failed": {i: r for i, r in checked.items() if isinstance(r, str)},
    }


def collect(output_dir: str | os.PathLike, now: float | None = None) -> dict:
    """Everything the status table shows, as plain data (also printed by ``--json``)."""
    layout = RunLayout(output_dir)
    now = time.time() if now is None else now
    status: dict = {
        "output_dir": str(output_dir),
        "now": now,
        "free_bytes": free_bytes(layout.shards_dir),
        "run_lock": holder_info(layout, now),
        "orphans": find_orphans(layout).summary(),
    }
    try:
        plan, mtimes = load_plan(layout), plan_mtimes(layout)
    except (OSError, ValueError, KeyError):
        plan = None
    if plan is None:
        status["prepared"] = False
        status["prepare_error"] = job_error(layout.log("prepare"))
        if not layout.prepared_dir.exists():
            status["store"] = gathered_store(layout)
        return status
    status["prepared"] = True
    written = [int(e["index"]) for e in plan["shards"] if layout.shard(int(e["index"])).exists()]
    written = [i for i in written if layout.shard(i).stat().st_mtime >= mtimes[i]]
    checked = check_finished(layout, plan, written) if written else {}
    shards = [
        shard_state(layout, entry, mtimes[int(entry["index"])], checked) for entry in plan["shards"]
    ]
    status["shards"] = shards
    counts = {key: 0 for key in ("done", "in progress", "pending", "failed")}
    for shard in shards:
        counts[shard["state"]] += 1
    status["counts"] = counts
    planned = sum(s["num_tokens"] for s in shards)
    done_tokens = sum(min(s["rows_done"], s["num_tokens"]) for s in shards)
    status.update(num_shards=len(shards), planned_tokens=planned, done_tokens=done_tokens)

    # Speed over the wall time in which some job was working; gaps between runs excluded.
    intervals = []
    finished = [s for s in shards if s["state"] == "done" and s.get("started_at") is not None]
    for shard in finished:
        intervals += [
            (c.get("started_at"), c.get("finished_at")) for c in shard.get("claims") or []
        ]
    for shard in shards:
        if shard["state"] == "in progress" and shard.get("job_started_at"):
            intervals.append((shard["job_started_at"], now))
    busy = busy_seconds(intervals)
    rate = done_tokens / busy if busy > 0 and done_tokens else None
    status.update(busy_seconds=busy, tokens_per_second=rate)
    remaining = planned - done_tokens
    status["eta_seconds"] = remaining / rate if rate else None
    status["groups"] = group_summary(finished)

    done = {s["index"] for s in shards if s["state"] == "done"}
    status["disk"] = run_needs(layout, plan, shards, done, counts["in progress"])
    status["gathered"] = layout.manifest.exists() and counts["done"] == len(shards)
    # A store gathered earlier whose shards now fail: it must not be trained on.
    status["store_damaged"] = sorted(
        i for i, r in checked.items() if isinstance(r, str) and layout.manifest.exists()
    )
    status["gather_error"] = job_error(layout.log("gather"), whole=True)
    if not status["gathered"]:
        status["disk"]["gather_bytes"] = sum(
            gather_bytes(int(plan["num_samples"]), len(shards), layout.plan.stat().st_size)
        )
        status["disk"]["remaining_bytes"] += status["disk"]["gather_bytes"]
    status["disk"]["free_bytes"] = status["free_bytes"]
    status["disk"]["fits"] = status["disk"]["remaining_bytes"] <= status["free_bytes"]
    return status


def run_lines(status: dict) -> list[str]:
    """The run lock's holder and orphaned shards, in every kind of status."""
    lines = []
    holder = status.get("run_lock")
    if holder:
        who = f"pid {holder['pid']} on {holder['host']}" if holder["pid"] else "another process"
        lines.append(
            f"  run lock: held by {who} for {duration(holder['held_seconds'])}; "
            f"{holder['doing']}; if that run is over or stuck, free the lock with {holder['free']}"
        )
    orphans = status.get("orphans") or {}
    if orphans.get("paths"):
        lines.append(orphans_line(orphans, status["output_dir"]))
    return lines


def render_store(status: dict) -> str:
    out_dir, store = status["output_dir"], status["store"]
    lines = [
        f"{out_dir}: a gathered store, no run state here: {store['num_shards']} shards, "
        f"{store['num_samples']} samples, {store['num_tokens']} tokens (manifest.json"
        f"{', index.h5' if store['index'] else '; index.h5 is missing'}); "
        f"`teacher-logits verify {out_dir}` checks every byte"
    ]
    for index, why in sorted(store["failed"].items()):
        lines.append(f"  WARNING: shard {index} {why}; do not train on this store: copy it again")
    return "\n".join(lines + run_lines(status))


def render(status: dict, show_all: bool = False) -> str:
    out_dir = status["output_dir"]
    if not status["prepared"] and status.get("store"):
        return render_store(status)
    if not status["prepared"]:
        lines = [
            f"{out_dir}: prepare has not finished yet (no prepared/plan.json); "
            "nothing to count or estimate until it has."
        ]
        if status.get("prepare_error"):
            lines.append(f"prepare failed: {status['prepare_error']}")
        lines.append(f"free disk under {out_dir}: {human_bytes(status['free_bytes'])}")
        return "\n".join(lines + run_lines(status))

    counts, planned, done = status["counts"], status["planned_tokens"], status["done_tokens"]
    n = status["num_shards"]
    partly = sum(1 for s in status["shards"] if s["state"] == "pending" and s["rows_done"])
    lines = [f"{out_dir}: {n} shards, {planned:,} tokens planned"]
    lines.append(
        f"  done {counts['done']}   in progress {counts['in progress']}   "
        f"pending {counts['pending']}"
        + (f" ({partly} partly done)" if partly else "")
        + f"   failed {counts['failed']}"
    )
    rate = status["tokens_per_second"]
    lines.append(
        f"  tokens done {done:,} / {planned:,} ({100 * done / max(planned, 1):.1f}%)"
        + (
            f"   {rate:,.0f} tokens/s over {duration(status['busy_seconds'])} of work"
            if rate
            else ""
        )
    )
    if done < planned:
        eta = f"  ETA {duration(status['eta_seconds'])}"
        if counts["in progress"] == 0:
            eta += " of work once running again (nothing is running now)"
        lines.append(eta)
    elif status["gathered"]:
        lines.append("  all shards done and gathered (index.h5, manifest.json)")
    else:
        lines.append("  all shards done; gather has not finished")
    if status.get("store_damaged"):
        lines.append(
            f"  WARNING: index.h5 and manifest.json are from an earlier gather, and "
            f"{shard_list(status['store_damaged'])} of that store now fail (below): do not "
            "train on it; delete the failing shards and rerun the same command"
        )
    if status.get("gather_error") and not status["gathered"]:
        first, *more = status["gather_error"].splitlines()
        lines.append(f"  gather failed: {first}")
        lines += [f"    {line.strip()}" for line in more[:GATHER_ERROR_LINES]]
        if len(more) > GATHER_ERROR_LINES:
            lines.append(
                f"    ... ({len(more) - GATHER_ERROR_LINES} more lines in logs/gather.log)"
            )
    lines += render_disk(status["disk"], status["free_bytes"], out_dir)
    lines += run_lines(status)

    rows = [
        s
        for s in status["shards"]
        if show_all
        or s["state"] in ("in progress", "failed")
        or s["rows_done"]
        and s["state"] != "done"
        or s["note"]
    ]
    if rows:
        lines += ["", f"{'shard':>6}  {'state':<12}{'tokens':>12}  {'done':>6}  note"]
        now = status["now"]
        for s in rows:
            pct = f"{100 * s['rows_done'] / max(s['num_tokens'], 1):5.1f}%"
            note = s.get("error") or s["note"]
            if s["state"] == "in progress" and s.get("updated_at"):
                note = (
                    note + "; " if note else ""
                ) + f"progress saved {duration(now - s['updated_at'])} ago"
            if s["state"] == "done" and s.get("generation_seconds"):
                note = (
                    f"{s['num_tokens'] / s['generation_seconds']:,.0f} tokens/s on "
                    f"{s.get('cuda_visible_devices') or 'cpu'}"
                )
            lines.append(
                f"{s['index']:>6}  {s['state']:<12}{s['num_tokens']:>12,}  {pct:>6}  {note}"
            )
    if not show_all and counts["done"] + counts["pending"] > len(rows):
        lines.append("(--all lists every shard)")

    if status["groups"]:
        lines += [
            "",
            "finished shards by GPU group:",
            f"  {'group':<24}{'shards':>7}{'tokens':>14}{'tokens/s':>12}",
        ]
        for group in status["groups"]:
            speed = group["tokens_per_second"]
            lines.append(
                f"  {group['group']:<24}{group['shards']:>7}{group['tokens']:>14,}"
                f"{(f'{speed:,.0f}' if speed else '-'):>12}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m teacher_logits.status") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Shards done, in progress, pending and failed; speed, ETA and disk needs of a run.",
    )
    parser.add_argument("output_dir", help="the run's output_dir (e.g. results/demo)")
    parser.add_argument(
        "--all", action="store_true", help="list every shard, not only the busy or failed ones"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the status as JSON for other tools"
    )
    args = parser.parse_args(argv)
    if not Path(args.output_dir).is_dir():
        print(
            f"status: {args.output_dir} does not exist yet; nothing has run there "
            "(give the run's output_dir)",
            file=sys.stderr,
        )
        return 1
    status = collect(args.output_dir)
    text = json.dumps(status, indent=1) if args.json else render(status, args.all)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader went away (`status | head -1`): what it wanted was printed. Point
        # stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
