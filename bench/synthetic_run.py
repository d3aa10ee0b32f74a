"""A run directory that the real gather accepts, built without a teacher.

    from synthetic_run import build_run, replace_shards
    layout = build_run(folder, num_shards=2000)     # prepared/ + plan.json + shards/

prepare's files (``prepared/tokens.h5`` through ``PreparedWriter``, ``prepared/plan.json``
with the keys prepare writes) and shards of at most ``tokens_per_shard`` tokens written
through ``ShardWriter`` with a generate job's attributes. Rows are real top-k rows of
softmaxes over random logits (a pool computed once, drawn per shard), so they pass
validation and compress like rows do: ids in range and in rank order, logsumexp and
entropy over the whole vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from teacher_logits.config import meaning_settings  # noqa: E402
from teacher_logits.fingerprints import config_fingerprint  # noqa: E402
from teacher_logits.layout import RunLayout  # noqa: E402
from teacher_logits.store.format import FORMAT_VERSION  # noqa: E402
from teacher_logits.store.prepared import PreparedWriter, read_prepared  # noqa: E402
from teacher_logits.store.writer import ShardWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunShape:
    num_shards: int
    tokens_per_shard: int = 1000
    vocab_size: int = 32000
    top_k: int = 64
    seed: int = 0
    pool_rows: int = 2048  # distinct rows drawn from (computing each costs a full softmax)


@functools.lru_cache(maxsize=2)
def row_pool(shape: RunShape) -> dict:
    """``pool_rows`` top-k rows of softmaxes over random logits, in rank order."""
    rng = np.random.default_rng(shape.seed)
    out: dict[str, list] = {"topk_ids": [], "topk_logits": [], "logsumexp": [], "entropy": []}
    for start in range(0, shape.pool_rows, 256):
        n = min(256, shape.pool_rows - start)
        # A heavy head over a flat tail, as an LM's logits have: a few tokens take most mass.
        logits = rng.standard_normal((n, shape.vocab_size), dtype=np.float32) * 2.0
        logits[np.arange(n)[:, None], rng.integers(0, shape.vocab_size, (n, 8))] += 8.0
        top = np.argpartition(-logits, shape.top_k, axis=1)[:, : shape.top_k]
        values = np.take_along_axis(logits, top, axis=1)
        rank = np.argsort(-values, axis=1, kind="stable")
        top, values = np.take_along_axis(top, rank, 1), np.take_along_axis(values, rank, 1)
        peak = logits.max(axis=1, keepdims=True)
        weights = np.exp(logits - peak)
        total = weights.sum(axis=1, keepdims=True)
        lse = (peak + np.log(total))[:, 0]
        probs = weights / total
        entropy = -(probs * np.log(np.maximum(probs, 1e-30))).sum(axis=1)
        out["topk_ids"].append(top.astype(np.int32))
        out["topk_logits"].append(values.astype(np.float16))
        out["logsumexp"].append(lse.astype(np.float32))
        out["entropy"].append(entropy.astype(np.float16))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _sample_lengths(rng, budget: int) -> list[int]:
    """Samples of 20 to 400 tokens filling at most ``budget`` tokens."""
    lengths, left = [], budget
    while left >= 20:
        length = int(min(left, rng.integers(20, 401)))
        lengths.append(length)
        left -= length
    return lengths or [budget]


def _plan(shape: RunShape, bounds: np.ndarray, offsets: np.ndarray) -> dict:
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["generation"]["top_k"] = shape.top_k
    config["num_shards"] = shape.num_shards
    settings = meaning_settings(config)
    teacher, tokenizer = "synthetic-teacher", "synthetic-tokenizer"
    return {
        "format_version": FORMAT_VERSION,
        "num_shards": shape.num_shards,
        "num_rows": int(bounds[-1]),
        "num_samples": int(bounds[-1]),
        "num_tokens": int(offsets[-1]),
        "truncated_samples": 0,
        "split_samples": 0,
        "max_length": int(config["tokenize"]["max_length"]),
        "top_k": shape.top_k,
        "vocab_size": shape.vocab_size,
        "teacher_fingerprint": teacher,
        "tokenizer_fingerprint": tokenizer,
        "config_fingerprint": config_fingerprint(settings, teacher, tokenizer),
        "teacher_content_digest": "synthetic-weights",
        "settings": settings,
        "shards": [
            {
                "index": i,
                "num_samples": int(bounds[i + 1] - bounds[i]),
                "num_tokens": int(offsets[bounds[i + 1]] - offsets[bounds[i]]),
            }
            for i in range(shape.num_shards)
        ],
        "dropped": [],
    }


def _tokens_digest(sample_ids, offsets, input_ids) -> str:
    """What a generate job records of its shard's tokens (shard_job.tokens_digest)."""
    digest = hashlib.sha256()
    for array in (sample_ids, offsets, input_ids):
        digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


# Set in the parent before the pool forks: the workers inherit them without pickling.
_SHARED: dict = {}


def _write_shard(job: tuple[int, int]) -> None:
    shard, draw = job
    layout, plan, prepared, pool = (_SHARED[k] for k in ("layout", "plan", "prepared", "pool"))
    sample_ids, offsets, input_ids = prepared.shard_slice(shard)
    rng = np.random.default_rng([plan["top_k"], shard, draw])
    pick = rng.integers(0, len(pool["logsumexp"]), len(input_ids))
    rows = {name: values[pick] for name, values in pool.items()}
    rows["input_ids"] = input_ids
    writer = ShardWriter(layout.shard(shard), len(sample_ids), len(input_ids), plan["top_k"])
    writer.write_block(sample_ids, np.diff(offsets), rows)
    now = time.time()
    claim = {"cuda_visible_devices": "", "hostname": socket.gethostname(), "started_at": now - 1}
    writer.commit(
        {
            "shard_index": shard,
            "num_shards": plan["num_shards"],
            "teacher_fingerprint": plan["teacher_fingerprint"],
            "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
            "config_fingerprint": plan["config_fingerprint"],
            "teacher_content_digest": plan["teacher_content_digest"],
            "tokens_digest": _tokens_digest(sample_ids, offsets, input_ids),
            **claim,
            "finished_at": now,
            "versions": {"python": platform.python_version(), "h5py": h5py.__version__},
            "claims": [{**claim, "finished_at": now, "rows": len(input_ids)}],
            "job_started_at": now - 2,
            "teacher_load_seconds": 0.0,
            "generation_seconds": 1.0,
        }
    )


def _write_shards(layout: RunLayout, shards: list[int], draw: int, pool: dict, workers: int):
    _SHARED.update(
        layout=layout,
        plan=json.loads(layout.plan.read_text()),
        prepared=read_prepared(layout.tokens),
        pool=pool,
    )
    jobs = [(shard, draw) for shard in shards]
    try:
        if workers <= 1:
            for job in jobs:
                _write_shard(job)
            return
        with multiprocessing.get_context("fork").Pool(workers) as processes:
            processes.map(_write_shard, jobs, chunksize=16)
    finally:
        _SHARED.clear()


def build_run(folder: Path, shape: RunShape, workers: int = 2) -> RunLayout:
    """prepare's files and every shard of a run of ``shape`` in ``folder``."""
    layout = RunLayout(folder)
    layout.prepared_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shape.seed)
    per_shard = [_sample_lengths(rng, shape.tokens_per_shard) for _ in range(shape.num_shards)]
    lengths = np.array([n for shard in per_shard for n in shard], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum([len(s) for s in per_shard])]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    writer = PreparedWriter(layout.tokens, with_loss_mask=False)
    try:
        writer.append(rng.integers(3, shape.vocab_size, int(offsets[-1]), dtype=np.int32))
        writer.commit(np.arange(len(lengths), dtype=np.int64), offsets, bounds)
    except BaseException:
        writer.abort()
        raise
    layout.plan.write_text(json.dumps(_plan(shape, bounds, offsets), indent=1))
    layout.regenerate_token.write_text("synthetic\n")
    _write_shards(layout, list(range(shape.num_shards)), 0, row_pool(shape), workers)
    return layout


def replace_shards(layout: RunLayout, shape: RunShape, shards: list[int], workers: int = 2):
    """Write these shards again with other rows (what regenerating them leaves)."""
    _write_shards(layout, shards, 1, row_pool(shape), workers)
