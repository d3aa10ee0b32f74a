"""Provenance: which GPU group, host, scheduler job and library versions made a shard.

Every committed part records the claim it was computed under; the finished shard
lists every claim that worked on it and the fingerprints of its run.
"""

from __future__ import annotations

import logging
import os
import platform
import time

import numpy as np

log = logging.getLogger("generate")


def library_versions() -> dict:
    import h5py
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def scheduler_job_id() -> str | None:
    """The cluster's id for this job (SLURM's, or another scheduler's), for provenance."""
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def part_attrs(claim, compute_seconds: float, engine: str = "pipeline") -> dict:
    """What a committed part records of the claim that computed it."""
    return {
        "claim_engine": engine,
        "claim_cuda_visible_devices": claim.cuda_visible_devices,
        "claim_hostname": claim.hostname,
        "claim_started_at": claim.started_at,
        "claim_scheduler_job_id": scheduler_job_id() or "",
        "committed_at": time.time(),
        "compute_seconds": compute_seconds,
    }


def claims_from_parts(parts: list[dict]) -> list[dict]:
    """One record per GPU-group claim that committed rows, in order (consecutive parts merge)."""
    claims: list[dict] = []
    for attrs in parts:
        key = (
            attrs["claim_hostname"],
            attrs["claim_cuda_visible_devices"],
            attrs["claim_started_at"],
        )
        if claims and claims[-1]["_key"] == key:
            claims[-1]["finished_at"] = float(attrs["committed_at"])
            claims[-1]["rows"] += int(attrs["num_rows"])
            continue
        claims.append(
            {
                "_key": key,
                "cuda_visible_devices": attrs["claim_cuda_visible_devices"],
                "hostname": attrs["claim_hostname"],
                "started_at": float(attrs["claim_started_at"]),
                "finished_at": float(attrs["committed_at"]),
                "rows": int(attrs["num_rows"]),
            }
        )
        if attrs.get("claim_engine"):  # parts from before engines record none
            claims[-1]["engine"] = attrs["claim_engine"]
        if attrs.get("claim_scheduler_job_id"):
            claims[-1]["scheduler_job_id"] = attrs["claim_scheduler_job_id"]
    for claim in claims:
        del claim["_key"]
    return claims


def shard_attrs(
    plan: dict, shard: int, parts, job_started_at: float, teacher_load_seconds: float
) -> dict:
    """The finished shard's attributes: fingerprints and provenance of every claim."""
    claims = claims_from_parts([attrs for _, attrs in parts.parts])
    num_tokens = parts.rows_done
    gen_seconds = sum(float(a["compute_seconds"]) for _, a in parts.parts)
    log.info(
        "generated %d tokens in %.1f s of compute (%.0f tokens/s) over %d claim(s); teacher "
        "load took %.1f s in this job",
        num_tokens,
        gen_seconds,
        num_tokens / max(gen_seconds, 1e-9),
        len(claims),
        teacher_load_seconds,
    )
    last = (
        claims[-1]
        if claims
        else {
            "cuda_visible_devices": "",
            "hostname": "",
            "started_at": job_started_at,
            "finished_at": time.time(),
        }
    )
    return {
        "shard_index": shard,
        "num_shards": int(plan["num_shards"]),
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
        # The claim that finished the shard; every claim that worked on it is in `claims`.
        "cuda_visible_devices": last["cuda_visible_devices"],
        "hostname": last["hostname"],
        "started_at": last["started_at"],
        "finished_at": last["finished_at"],
        "versions": library_versions(),
        "claims": claims,
        "job_started_at": job_started_at,
        "teacher_load_seconds": teacher_load_seconds,
        "generation_seconds": gen_seconds,
    }
