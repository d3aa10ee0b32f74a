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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .disk import free_bytes, gather_bytes, human_bytes, render_disk, run_needs
from .errors import LockError, ShardError
from .fingerprints import stat_key
from .layout import RunLayout, atomic_write_text, job_record_for, partial_path
from .locks import held_by_another
from .run_stats import busy_seconds, group_summary
from .shard_plan import load_plan, plan_mtimes
from .store.identity import FINGERPRINTS, identity_mismatch, shard_list
from .store.isolated import check_batched
from .store.validate import quick_check

# Provenance a finished shard's attributes give the table and the speed figures.
PROVENANCE_KEYS = (
    "cuda_visible_devices",
    "hostname",
    "started_at",
    "finished_at",
    "claims",
    "generation_seconds",
    "teacher_load_seconds",
)
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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_finished(layout: RunLayout, plan: dict, indexes: list[int]) -> dict:
    """Quick-check finished shards: per shard its provenance, or why it fails (a str).

    In worker processes (a libhdf5 crash on a corrupt file costs a worker, not status),
    and only where a shard's file changed since the last status: results are kept in
    ``layout.status_checks`` by size, mtime, ctime and inode (ctime moves with any write or
    ``touch``, so a truncated shard whose mtime was put back is checked again).
    """
    expected = {k: plan[k] for k in ("top_k", *FINGERPRINTS) if k in plan}
    cache_path = layout.status_checks
    cache = read_json(cache_path) or {}
    known = cache.get("shards", {}) if cache.get("expected") == expected else {}
    keys = {index: shard_stat_key(layout.shard(index)) for index in indexes}
    results = {
        index: known[str(index)]["result"]
        for index in indexes
        if known.get(str(index), {}).get("key") == keys[index]
    }

    def check(index: int) -> dict:
        entry = plan["shards"][index]
        attrs = quick_check(layout.shard(index), entry["num_samples"], entry["num_tokens"])
        wrong = identity_mismatch(attrs, {**expected, "shard_index": index})
        if wrong:
            raise ShardError(f"is not this run's shard {index} ({'; '.join(wrong)})")
        return {key: attrs.get(key) for key in PROVENANCE_KEYS}

    todo = [index for index in indexes if index not in results]
    if todo:
        for r in check_batched(check, todo):
            results[r.item] = r.value if r.error is None else r.error
        shards = {str(i): {"key": keys[i], "result": results[i]} for i in indexes if keys[i]}
        try:  # a read-only output_dir or a full disk only costs the next status its speed
            atomic_write_text(cache_path, json.dumps({"expected": expected, "shards": shards}))
        except OSError:
            partial_path(cache_path).unlink(missing_ok=True)
    return results


def shard_stat_key(path: Path) -> str | None:
    try:
        return stat_key(path)
    except OSError:
        return None


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


def collect(output_dir: str | os.PathLike, now: float | None = None) -> dict:
    """Everything the status table shows, as plain data (also printed by ``--json``)."""
    layout = RunLayout(output_dir)
    now = time.time() if now is None else now
    status: dict = {
        "output_dir": str(output_dir),
        "now": now,
        "free_bytes": free_bytes(layout.shards_dir),
    }
    try:
        plan, mtimes = load_plan(layout), plan_mtimes(layout)
    except (OSError, ValueError, KeyError):
        plan = None
    if plan is None:
        status["prepared"] = False
        status["prepare_error"] = job_error(layout.log("prepare"))
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


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def render(status: dict, show_all: bool = False) -> str:
    out_dir = status["output_dir"]
    if not status["prepared"]:
        lines = [
            f"{out_dir}: prepare has not finished yet (no prepared/plan.json); "
            "nothing to count or estimate until it has."
        ]
        if status.get("prepare_error"):
            lines.append(f"prepare failed: {status['prepare_error']}")
        lines.append(f"free disk under {out_dir}: {human_bytes(status['free_bytes'])}")
        return "\n".join(lines)

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
