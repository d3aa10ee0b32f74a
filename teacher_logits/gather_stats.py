"""Gather's manifest entries and statistics: per shard and over the run, from the one
validation pass (``ShardSummary`` of each shard)."""

from __future__ import annotations

import os

from .row_bytes import planned_row, uncompressed_bytes_per_token
from .run_stats import group_summary, overall_rate
from .store.stats import MASS_BINS, entropy_bins


def shard_entry(index: int, path: str, relative: str, summary) -> dict:
    """A shard's manifest entry: counts, checksum, size, provenance and fidelity."""
    attrs = summary.attrs
    generation_seconds = attrs.get("generation_seconds")
    return {
        "index": index,
        "path": relative,
        "num_samples": summary.num_samples,
        "num_tokens": summary.num_tokens,
        # Hashed by the worker that checked the shard (or kept from a cached check).
        "sha256": summary.sha256,
        "bytes": summary.file_bytes,
        "cuda_visible_devices": attrs["cuda_visible_devices"],
        "hostname": attrs["hostname"],
        "started_at": attrs["started_at"],
        "finished_at": attrs["finished_at"],
        "claims": attrs["claims"],
        "job_started_at": attrs.get("job_started_at"),
        "teacher_load_seconds": attrs.get("teacher_load_seconds"),
        "generation_seconds": generation_seconds,
        "tokens_per_second": summary.num_tokens / generation_seconds
        if generation_seconds
        else None,
        "mean_topk_mass": summary.stats.topk_mass_sum / max(summary.num_rows, 1),
        "next_token_in_topk_fraction": (
            summary.stats.next_token_in_topk / max(summary.stats.next_token_rows, 1)
        ),
        **loss_mask_counts([summary]),
    }


def loss_mask_counts(summaries: list) -> dict:
    """Chat data: tokens trained on (loss_mask 1) and not, and the top-k rows stored."""
    if any(s.loss_mask_ones is None for s in summaries):
        return {}
    ones = sum(s.loss_mask_ones for s in summaries)
    return {
        "loss_mask": {"ones": ones, "zeros": sum(s.num_tokens for s in summaries) - ones},
        "stored_rows": sum(s.num_rows for s in summaries),
    }


def run_statistics(summaries: list, shards: list[dict], plan: dict, index_path: str) -> dict:
    """The manifest's ``stats``: teacher fidelity, storage and throughput, from gather's one pass."""
    total_tokens = sum(s.num_tokens for s in summaries)
    # Means over the rows stored: every token, or fewer with store_masked_only.
    total_rows = sum(s.num_rows for s in summaries)
    mass_hist = sum(s.stats.topk_mass_hist for s in summaries)
    hits = sum(s.stats.next_token_in_topk for s in summaries)
    next_rows = sum(s.stats.next_token_rows for s in summaries)
    shard_bytes = sum(entry["bytes"] for entry in shards)
    with_entropy = [s for s in summaries if len(s.stats.entropy_hist)]
    dataset_bytes: dict = {}
    for summary in summaries:
        for name, size in summary.dataset_bytes.items():
            dataset_bytes[name] = dataset_bytes.get(name, 0) + size
    return {
        "mean_topk_mass": sum(s.stats.topk_mass_sum for s in summaries) / max(total_rows, 1),
        "topk_mass_histogram": {"bin_edges": MASS_BINS.tolist(), "counts": mass_hist.tolist()},
        "mean_entropy_nats": (
            sum(s.stats.entropy_sum for s in with_entropy)
            / max(sum(s.num_rows for s in with_entropy), 1)
            if with_entropy
            else None
        ),
        # null when no shard stored the entropy dataset (generation.store_entropy=false).
        "entropy_histogram": {
            "unit": "nats",
            "bin_edges": entropy_bins(plan["vocab_size"]).tolist(),
            "counts": sum(s.stats.entropy_hist for s in with_entropy).tolist(),
            "num_tokens": sum(s.num_rows for s in with_entropy),
        }
        if with_entropy
        else None,
        "next_token_in_topk_fraction": hits / max(next_rows, 1),
        "next_token_rows": next_rows,
        "bytes_per_token": shard_bytes / max(total_tokens, 1),
        "uncompressed_bytes_per_token": uncompressed_bytes_per_token(
            plan["top_k"],
            plan["settings"]["storage"]["value_dtype"],
            bool(with_entropy),
            **planned_row(plan),
        ),
        "total_bytes": shard_bytes,
        "index_bytes": os.path.getsize(index_path),
        # Compressed bytes per dataset over all shards: where the storage goes.
        "dataset_bytes": dataset_bytes,
        "throughput": {**overall_rate(shards), "groups": group_summary(shards)},
    }
