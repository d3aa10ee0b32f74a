"""Gather: validate every shard, then write ``index.h5`` and ``manifest.json``.

A shard that fails any check stops the gather with one line per bad shard and the
command that regenerates it; nothing already finished is touched.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from .disk import uncompressed_bytes_per_token
from .errors import ShardError
from .fingerprints import file_sha256
from .generation.parts import remove_parts_dirs
from .layout import RunLayout, atomic_write_text, partial_path
from .run_stats import group_summary, overall_rate
from .store.format import FORMAT_VERSION
from .store.isolated import check_isolated, default_workers
from .store.prepared import read_prepared_sample_ids, read_prepared_shard
from .store.stats import MASS_BINS, entropy_bins
from .store.validate import ShardExpectation, validate_shard

log = logging.getLogger("gather")


# Snakemake options that must not be repeated in the printed command.
_DROP_WITH_VALUE = {"--forcerun", "-R", "--until", "-U", "--omit-from", "-O"}
_DROP_FLAGS = {"-n", "--dry-run", "--dryrun", "-F", "--forceall", "-f", "--force"}


def shard_entry(index: int, path: str, relative: str, summary) -> dict:
    """A shard's manifest entry: counts, checksum, size, provenance and fidelity."""
    attrs = summary.attrs
    generation_seconds = attrs.get("generation_seconds")
    return {
        "index": index,
        "path": relative,
        "num_samples": summary.num_samples,
        "num_tokens": summary.num_tokens,
        "sha256": file_sha256(path),
        "bytes": os.path.getsize(path),
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
            plan["top_k"], plan["settings"]["storage"]["value_dtype"], bool(with_entropy)
        ),
        "total_bytes": shard_bytes,
        "index_bytes": os.path.getsize(index_path),
        # Compressed bytes per dataset over all shards: where the storage goes.
        "dataset_bytes": dataset_bytes,
        "throughput": {**overall_rate(shards), "groups": group_summary(shards)},
    }


def _snakemake_argv() -> list[str] | None:
    """The command line of the ``snakemake`` process running this job, if it is local."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            status = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        args = [a.decode(errors="replace") for a in argv]
        if len(args) > 1 and Path(args[0]).name.startswith("python"):
            if args[1:3] == ["-m", "snakemake"]:
                args = ["snakemake", *args[3:]]
            elif Path(args[1]).name == "snakemake":  # the entry point, run through its #!
                args = args[1:]
        if args and Path(args[0]).name == "snakemake":
            on_path = shutil.which("snakemake")
            if on_path and Path(on_path).resolve() == Path(args[0]).resolve():
                args[0] = "snakemake"
            # A job that a cluster executor started runs under an inner snakemake.
            return None if "--target-jobs" in args or "--mode" in args else args
        pid = int(status.rsplit(")", 1)[1].split()[1])
    return None


def regenerate_hint(shard_paths: list[str]) -> str:
    """The user's own command with ``--forcerun`` for the bad shards, or a template."""
    argv = _snakemake_argv()
    if argv is None:
        return "snakemake --cores N <your usual --config/--configfile> --forcerun " + " ".join(
            shlex.quote(p) for p in shard_paths
        )
    kept, dropping = [], False
    for arg in argv:
        if dropping and not arg.startswith("-"):
            continue  # a value of the dropped option (--forcerun takes several)
        dropping = arg in _DROP_WITH_VALUE
        if dropping or arg in _DROP_FLAGS or arg.split("=", 1)[0] in _DROP_WITH_VALUE:
            continue
        if arg.startswith("force_regenerate="):
            continue  # repeating it would regenerate every shard, not just the bad ones
        kept.append(arg)
    # A --config left without values would be a usage error.
    kept = [
        arg
        for i, arg in enumerate(kept)
        if arg not in ("--config", "-C") or (i + 1 < len(kept) and not kept[i + 1].startswith("-"))
    ]
    return shlex.join([*kept, "--forcerun", *shard_paths])


def gather(layout: RunLayout, workers: int | None = None) -> None:
    """Validate every planned shard of the run, then index them into one store."""
    start = time.time()
    plan = json.loads(layout.plan.read_text())
    tokens_path, index_out, manifest_out = layout.tokens, layout.index, layout.manifest
    shard_paths = [str(layout.shard(i)) for i in range(int(plan["num_shards"]))]
    masked_only = bool(plan["settings"]["generation"].get("store_masked_only", False))
    store_dir = layout.output_dir
    expected_common = {
        "num_shards": plan["num_shards"],
        "top_k": plan["top_k"],
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
    }

    def check(index: int, progress):
        # Runs in a worker process: a libhdf5 crash on a corrupt file kills only the worker.
        # One shard's tokens at a time: gather's memory does not grow with the dataset.
        prepared = read_prepared_shard(tokens_path, index)
        sample_ids, offsets, input_ids = prepared.shard_slice(0)
        expected = ShardExpectation(
            sample_ids=sample_ids,
            offsets=offsets,
            input_ids=input_ids,
            attrs={**expected_common, "shard_index": index},
            vocab_size=plan["vocab_size"],
            loss_mask=prepared.loss_mask,
            masked_only=masked_only,
        )
        return validate_shard(shard_paths[index], expected, progress=progress)

    workers = default_workers(workers)
    log.info("validating %d shards in %d worker process(es)", len(shard_paths), workers)
    summaries, problems = [], []
    for result in check_isolated(check, range(len(shard_paths)), workers):
        index = result.item
        if result.error is None:
            log.info("shard %d is valid: %s", index, shard_paths[index])
            summaries.append((index, shard_paths[index], result.value))
        else:
            log.info("shard %d is bad: %s: %s", index, shard_paths[index], result.error)
            problems.append((index, shard_paths[index], result.error))
    summaries.sort(key=lambda entry: entry[0])
    problems.sort(key=lambda entry: entry[0])
    if problems:
        lines = [f"shard {i} ({path}): {why}" for i, path, why in problems]
        raise ShardError(
            f"{len(problems)} shard(s) failed validation; finished shards were not touched:\n  "
            + "\n  ".join(lines)
            + f"\nRegenerate them with: {regenerate_hint([path for _, path, _ in problems])}"
        )

    all_ids = np.concatenate([s.sample_ids for _, _, s in summaries])
    if len(np.unique(all_ids)) != len(all_ids):
        raise ShardError("a sample id appears in more than one shard; rerun prepare and all shards")
    if not np.array_equal(np.sort(all_ids), np.sort(read_prepared_sample_ids(tokens_path))):
        raise ShardError("the shards do not hold exactly the samples prepare planned")

    # Per-sample index in sample-id order: which shard, which position inside it.
    shard_of = np.concatenate([np.full(s.num_samples, i, dtype=np.int32) for i, _, s in summaries])
    position = np.concatenate([np.arange(s.num_samples, dtype=np.int64) for _, _, s in summaries])
    lengths = np.concatenate([np.diff(s.offsets) for _, _, s in summaries])
    order = np.argsort(all_ids, kind="stable")
    relative = [os.path.relpath(Path(p).resolve(), store_dir.resolve()) for _, p, _ in summaries]

    temp = partial_path(index_out)
    with h5py.File(temp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in expected_common.items():
            f.attrs[key] = value
        f.attrs["num_samples"] = len(all_ids)
        f.attrs["num_tokens"] = int(lengths.sum())
        f.attrs["has_loss_mask"] = all(s.loss_mask_ones is not None for _, _, s in summaries)
        f.attrs["masked_only"] = masked_only
        f.create_dataset(
            "shard_paths", data=np.array(relative, dtype=object), dtype=h5py.string_dtype()
        )
        f.create_dataset("sample_ids", data=all_ids[order])
        f.create_dataset("sample_shard", data=shard_of[order])
        f.create_dataset("sample_position", data=position[order])
        f.create_dataset("sample_length", data=lengths[order])
    os.replace(temp, index_out)

    total_tokens = int(lengths.sum())
    shards = [shard_entry(i, p, rel, s) for (i, p, s), rel in zip(summaries, relative)]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": time.time(),
        "num_samples": len(all_ids),
        "num_tokens": total_tokens,
        "top_k": plan["top_k"],
        "vocab_size": plan["vocab_size"],
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
        "settings": plan["settings"],
        "shards": shards,
        "dropped": plan["dropped"],
        "truncated_samples": plan["truncated_samples"],
        "split_samples": plan.get("split_samples", 0),
        **loss_mask_counts([s for _, _, s in summaries]),
        "stats": run_statistics([s for _, _, s in summaries], shards, plan, index_out),
    }
    # `python -m teacher_logits.verify` checks a copied store against these.
    manifest["index"] = {
        "path": os.path.relpath(Path(index_out).resolve(), store_dir.resolve()),
        "sha256": file_sha256(index_out),
        "bytes": os.path.getsize(index_out),
    }
    atomic_write_text(manifest_out, json.dumps(manifest, indent=1))
    # The store is complete: the copies generate kept for a killed run are not needed.
    remove_parts_dirs(shard_paths)
    seconds = time.time() - start
    log.info(
        "gathered %d shards, %d samples, %d tokens in %.1f s (%.0f tokens/s); mean top-k mass %.3f",
        len(summaries),
        len(all_ids),
        total_tokens,
        seconds,
        total_tokens / max(seconds, 1e-9),
        manifest["stats"]["mean_topk_mass"],
    )
