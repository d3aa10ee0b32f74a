"""Where a run stands: ``python -m teacher_logits.status OUTPUT_DIR``.

Reads only what the jobs leave on disk, so it works while Snakemake runs, after
it crashed, and from another shell: the plan prepare wrote, finished shards, the
lock a working generate job holds on its shard, the progress record it commits,
and the record each job keeps of its own state (``job.run_job``). Needs the
standard library and h5py (for the provenance of finished shards); never
Snakemake or torch.

A shard is
- done: its shard file exists (and is newer than the plan);
- in progress: a generate job holds the flock on the shard's lock file;
- failed: not running, and its job recorded an error;
- pending: anything else (partly done when it has committed progress).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from .disk import bytes_per_token, free_bytes, human_bytes
from .layout import RunLayout, job_record_for
from .run_stats import busy_seconds, group_summary


def lock_held(path: Path) -> bool:
    """Whether some process holds a flock on ``path``; our own probe is released at once."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # Shared: it conflicts with a job's exclusive lock but not with another status probe.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def job_record(log_path: Path) -> dict:
    """The state a job recorded beside its log (empty when it never started)."""
    return read_json(job_record_for(log_path)) or {}


def job_error(log_path: Path) -> str | None:
    """The error line a failed job recorded, if its last run failed."""
    record = job_record(log_path)
    if record.get("state") != "failed" or not record.get("error"):
        return None
    return record["error"].splitlines()[0]  # gather's lists every bad shard below it


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished_provenance(path: Path) -> dict:
    """Provenance attributes of a finished shard; empty when it cannot be read."""
    try:
        import h5py

        from .store.format import read_attrs

        with h5py.File(path, "r") as handle:
            attrs = read_attrs(handle)
    except Exception:  # a corrupt shard is gather's to report; status just shows no timing
        return {}
    keys = (
        "cuda_visible_devices",
        "hostname",
        "started_at",
        "finished_at",
        "claims",
        "generation_seconds",
        "teacher_load_seconds",
    )
    return {key: attrs.get(key) for key in keys}


def shard_state(layout: RunLayout, entry: dict, plan_mtime: float) -> dict:
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
            state.update(
                state="done", rows_done=state["num_tokens"], **finished_provenance(shard_path)
            )
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
    plan = read_json(layout.plan)
    if plan is None:
        status["prepared"] = False
        status["prepare_error"] = job_error(layout.log("prepare"))
        return status
    status["prepared"] = True
    plan_mtime = layout.plan.stat().st_mtime
    shards = [shard_state(layout, entry, plan_mtime) for entry in plan["shards"]]
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

    estimate = bytes_per_token(plan, layout)
    need = sum(
        estimate.shard_bytes(s["num_tokens"], s["num_samples"])
        for s in shards
        if s["state"] != "done"
    )
    total = sum(estimate.shard_bytes(s["num_tokens"], s["num_samples"]) for s in shards)
    status["disk"] = {
        "bytes_per_token": estimate.bytes_per_token,
        "basis": estimate.basis,
        "total_bytes": total,
        "remaining_bytes": need,
        "free_bytes": status["free_bytes"],
        "fits": need <= status["free_bytes"],
    }
    status["gathered"] = layout.manifest.exists() and counts["done"] == len(shards)
    status["gather_error"] = job_error(layout.log("gather"))
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
    if status.get("gather_error") and not status["gathered"]:
        lines.append(f"  gather failed: {status['gather_error']}")

    disk = status["disk"]
    lines.append(
        f"  disk: {human_bytes(disk['total_bytes'])} for the whole run at "
        f"{disk['bytes_per_token']:.0f} bytes/token ({disk['basis']}); "
        f"{human_bytes(disk['remaining_bytes'])} still to write, "
        f"{human_bytes(disk['free_bytes'])} free"
    )
    if not disk["fits"]:
        lines.append(
            f"  WARNING: not enough disk: the remaining shards need about "
            f"{human_bytes(disk['remaining_bytes'])} but only {human_bytes(disk['free_bytes'])} "
            f"are free under {out_dir}/shards; free space or move output_dir before the run"
        )

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teacher_logits.status",
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
    print(json.dumps(status, indent=1) if args.json else render(status, args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
