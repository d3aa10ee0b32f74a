"""A store of 2,000 shards: incremental gather and a bounded reader (issue 13).

    python bench/bench_scale.py [--quick]

A run of 2,000 shards of at most 1,000 tokens each is built without a teacher
(synthetic_run.py: real prepare files, shards through ShardWriter), then:

- gather (as a library) of all shards, then again after 20 shards were written anew:
  the check cache makes the second one check only those 20
  (``gather_incremental_ratio`` = incremental / full seconds);
- every sample read once through ``ShardLocalBatchSampler`` by a DataLoader with 4
  workers under ``ulimit -n 256``, at 2,000 and at 50 shards, each in a fresh process:
  each worker's peak RSS (VmHWM) at 2,000 over that at 50 (``reader_rss_ratio_2000_vs_50``).

``--quick`` writes 500 tokens per shard (1,000 in the full run) and reads one epoch
(two in the full run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from synthetic_run import RunShape, build_run, replace_shards  # noqa: E402

from teacher_logits import LogitStore  # noqa: E402
from teacher_logits.fingerprints import file_sha256  # noqa: E402
from teacher_logits.gather import gather  # noqa: E402

from common import Timer, emit, machine, table  # noqa: E402

SCALE_SHARDS, SMALL_SHARDS, REPLACED = 2000, 50, 20
READER_WORKERS, FILE_LIMIT = 4, 256


class _GatherLog(logging.Handler):
    """Keeps gather's summary line (its checking / indexing split)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.line = ""

    def emit(self, record):
        if record.getMessage().startswith("gathered "):
            self.line = record.getMessage()


def timed_gather(layout) -> dict:
    """One gather as Snakemake runs it (the previous index and manifest deleted first)."""
    for path in (layout.index, layout.manifest):
        path.unlink(missing_ok=True)
    handler, logger = _GatherLog(), logging.getLogger("gather")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its per-shard lines would flood the table
    try:
        with Timer() as t:
            gather(layout)
    finally:
        logger.removeHandler(handler)
    split = re.search(
        r"\((\d+) checked now.*\(([\d.]+) s checking, ([\d.]+) s indexing", handler.line
    )
    checked, checking, indexing = split.groups() if split else (None, None, None)
    return {
        "seconds": t.seconds,
        "checked": int(checked) if checked else None,
        "checking_s": float(checking) if checking else None,
        "indexing_s": float(indexing) if indexing else None,
    }


# --- the reader, in a fresh process per store ------------------------------------------


def _worker_batch(records: list[dict]):
    """collate_fn: which samples this batch read, and the worker's peak RSS and open files."""
    from torch.utils.data import get_worker_info

    status = Path("/proc/self/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    return (
        np.array([int(r["sample_id"]) for r in records], dtype=np.int64),
        get_worker_info().id,
        peak_kib,
        len(os.listdir("/proc/self/fd")),
    )


def read_every_sample(store_dir: str, epochs: int) -> dict:
    """Each epoch reads every sample exactly once; peaks per worker (over all epochs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(FILE_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))  # inherited by the workers
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 on 2 cores
    from torch.utils.data import DataLoader

    from teacher_logits.training import ShardLocalBatchSampler

    store = LogitStore(store_dir)
    sampler = ShardLocalBatchSampler(store, max_tokens=16384, seed=0)
    loader = DataLoader(
        store,
        batch_sampler=sampler,
        collate_fn=_worker_batch,
        num_workers=READER_WORKERS,
        multiprocessing_context="fork",
    )
    ids = np.asarray(store.sample_ids)
    peaks, files, start = {}, {}, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        seen = np.zeros(len(ids), dtype=np.int64)
        for sample_ids, worker, peak_kib, open_files in loader:
            np.add.at(seen, np.searchsorted(ids, sample_ids), 1)
            peaks[worker] = max(peaks.get(worker, 0), peak_kib)
            files[worker] = max(files.get(worker, 0), open_files)
        if not (seen == 1).all():
            raise SystemExit(f"epoch {epoch}: {(seen != 1).sum()} samples not read exactly once")
    return {
        "samples": len(ids),
        "tokens": int(store.num_tokens),
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": {w: kib / 1024 for w, kib in sorted(peaks.items())},
        "open_files": max(files.values()),
        "file_limit": limit,
    }


def reader_in_fresh_process(store_dir: Path, epochs: int) -> dict:
    command = [sys.executable, __file__, "--reader", str(store_dir), "--epochs", str(epochs)]
    run = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


# --- the benchmark -----------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reader:
        print(json.dumps(read_every_sample(args.reader, args.epochs)))
        return
    epochs = 1 if args.quick else 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        shape = RunShape(num_shards=SCALE_SHARDS, tokens_per_shard=500 if args.quick else 1000)
        with Timer() as built:
            layout = build_run(Path(tmp) / "big", shape)
        full = timed_gather(layout)
        with Timer() as hashed:  # what gather's head used to do after validating
            for i in range(SCALE_SHARDS):
                file_sha256(layout.shard(i))
        again = timed_gather(layout)
        replaced = list(range(0, SCALE_SHARDS, SCALE_SHARDS // REPLACED))[:REPLACED]
        replace_shards(layout, shape, replaced)
        incremental = timed_gather(layout)
        small = build_run(Path(tmp) / "small", replace(shape, num_shards=SMALL_SHARDS))
        timed_gather(small)
        read_big = reader_in_fresh_process(layout.output_dir, epochs)
        read_small = reader_in_fresh_process(small.output_dir, epochs)

    ratio = incremental["seconds"] / full["seconds"]
    table(
        f"Gather of {SCALE_SHARDS:,} shards of <= {shape.tokens_per_shard:,} tokens "
        f"({built.seconds:.0f} s to build)",
        ["gather", "shards checked", "seconds", "checking s", "indexing s", "vs full"],
        [
            ["full", full["checked"], full["seconds"], full["checking_s"], full["indexing_s"], 1.0],
            ["nothing changed", again["checked"], again["seconds"], again["checking_s"],
             again["indexing_s"], again["seconds"] / full["seconds"]],
            [f"{REPLACED} replaced", incremental["checked"], incremental["seconds"],
             incremental["checking_s"], incremental["indexing_s"], ratio],
            ["(sha256 of every shard, serially)", "", hashed.seconds, "", "", ""],
        ],
    )  # fmt: skip
    peak_big = max(read_big["peak_rss_mib"].values())
    peak_small = max(read_small["peak_rss_mib"].values())
    table(
        f"Reading every sample: ShardLocalBatchSampler, DataLoader with {READER_WORKERS} "
        f"workers, ulimit -n {read_big['file_limit']}, {epochs} epoch(s)",
        ["shards", "samples", "tokens", "seconds", "worker peak RSS MiB", "max open files"],
        [
            [SMALL_SHARDS, read_small["samples"], read_small["tokens"], read_small["seconds"],
             peak_small, read_small["open_files"]],
            [SCALE_SHARDS, read_big["samples"], read_big["tokens"], read_big["seconds"],
             peak_big, read_big["open_files"]],
        ],
    )  # fmt: skip
    print(f"\n{machine()}; {time.perf_counter() - started:.0f} s in all")
    emit(
        {
            "bench": "scale",
            "machine": machine(),
            "scale_shards": SCALE_SHARDS,
            "gather_full_s_2000": full["seconds"],
            "gather_incremental_s_2000": incremental["seconds"],
            "gather_incremental_ratio": ratio,
            "gather_checking_s_2000": full["checking_s"],
            "gather_indexing_s_2000": full["indexing_s"],
            "reader_peak_rss_mib_2000": peak_big,
            "reader_peak_rss_mib_50": peak_small,
            "reader_rss_ratio_2000_vs_50": peak_big / peak_small,
        }
    )


if __name__ == "__main__":
    main()
