"""Throughput arithmetic over shard provenance, shared by gather, status and the report
(and ``duration``, how they print a span of time).

Plain Python on dicts (a manifest's ``shards`` entries or a shard's attributes), so
the status command and the report never need HDF5 or torch for it.
"""

from __future__ import annotations


def group_label(cuda_visible_devices: str | None, hostname: str | None) -> str:
    """One GPU group: the devices a claim ran on, on its host ("cpu" when none)."""
    devices = cuda_visible_devices if cuda_visible_devices else "cpu"
    return f"{hostname}:{devices}" if hostname else devices


def claims_of(shard: dict) -> list[dict]:
    """Every claim that worked on a shard; a shard from before claims were recorded has one."""
    claims = shard.get("claims") or []
    if claims:
        return claims
    return [
        {
            "cuda_visible_devices": shard.get("cuda_visible_devices"),
            "hostname": shard.get("hostname"),
            "started_at": shard.get("started_at"),
            "finished_at": shard.get("finished_at"),
            "rows": shard.get("num_tokens"),
        }
    ]


def busy_seconds(intervals) -> float:
    """Length of the union of (start, end) intervals: wall time with at least one job working.

    Gaps between runs (a crash, a night off) are left out, so a rate over this
    time is what the workflow achieves while it runs.
    """
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(
        (float(s), float(e)) for s, e in intervals if s is not None and e is not None
    ):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def group_summary(shards: list[dict]) -> list[dict]:
    """Per GPU group: shards finished there, tokens, busy time and tokens/s.

    A shard counts for the group of the claim that finished it; its tokens/s is
    tokens over the summed generation time of the group's shards, so groups that
    waited for work do not look slow.
    """
    groups: dict[str, dict] = {}
    for shard in shards:
        label = group_label(shard.get("cuda_visible_devices"), shard.get("hostname"))
        entry = groups.setdefault(
            label,
            {"group": label, "shards": 0, "tokens": 0, "generation_seconds": 0.0, "intervals": []},
        )
        entry["shards"] += 1
        entry["tokens"] += int(shard["num_tokens"])
        seconds = shard.get("generation_seconds")
        if seconds is None:
            seconds = (shard.get("finished_at") or 0) - (shard.get("started_at") or 0)
        entry["generation_seconds"] += float(seconds)
        entry["intervals"] += [
            (c.get("started_at"), c.get("finished_at")) for c in claims_of(shard)
        ]
    out = []
    for label in sorted(groups):
        entry = groups[label]
        busy = busy_seconds(entry.pop("intervals"))
        entry["busy_seconds"] = busy
        entry["tokens_per_second"] = (
            entry["tokens"] / entry["generation_seconds"]
            if entry["generation_seconds"] > 0
            else None
        )
        out.append(entry)
    return out


def overall_rate(shards: list[dict]) -> dict:
    """Tokens done, wall time with some job busy, and tokens/s over that time."""
    tokens = sum(int(s["num_tokens"]) for s in shards)
    busy = busy_seconds(
        (c.get("started_at"), c.get("finished_at")) for s in shards for c in claims_of(s)
    )
    return {
        "tokens": tokens,
        "busy_seconds": busy,
        "tokens_per_second": tokens / busy if busy > 0 else None,
    }


def duration(seconds: float | None) -> str:
    """A span of seconds as people read it: ``2h 05m``, ``3m 07s``."""
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
