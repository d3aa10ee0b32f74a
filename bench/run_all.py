"""Every benchmark in one command; the last line printed is one JSON object.

    python bench/run_all.py --quick      # about an hour on 2 cores (bench_fidelity: ~35 min)
    python bench/run_all.py              # bigger sizes

Each benchmark runs in its own process (a fresh interpreter, so one cannot warm
or slow another); ratios are measured inside one process, under the same load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, table  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_generate.py",
    "bench_parallel.py",
    "bench_store.py",
    "bench_scale.py",
    "bench_plan.py",
    "bench_fingerprint.py",
    "bench_distill.py",
    "bench_fidelity.py",
]
# target: (key, comparison, bound, what)
TARGETS = [
    ("floor_ratio", ">=", 0.95, "generate job vs floor tokens/s"),
    ("naive_ratio", ">=", 3.0, "generate job vs naive script tokens/s"),
    ("storage_fraction_of_naive", "<=", 0.28, "default storage / naive 388 B/token"),
    ("storage_fraction_of_naive_128k", "<=", 0.45, "default storage at a 128,256 vocabulary"),
    ("write_speedup", ">=", 3.0, "shard writer vs the previous writer, same rows"),
    ("storage_read_mb_per_s", ">=", 300.0, "default storage read MB/s"),
    ("gather_tokens_per_s", ">=", 1e6, "gather validation + indexing tokens/s"),
    ("reader_tokens_per_s", ">=", 250e3, "reader, random order, 1 process, tokens/s"),
    ("reader_rss_ratio_2000_vs_50", "<=", 1.2, "reader worker peak RSS, 2,000 vs 50 shards"),
    ("gather_incremental_ratio", "<=", 0.10, "gather after replacing 20 of 2,000 shards"),
    ("plan_ratio_1000", "<=", 2.0, "snakemake -n at 1,000 shards vs bare"),
    (
        "teacher_content_digest_fraction_of_load",
        "<=",
        0.03,
        "weights fingerprint vs reading the weights",
    ),
    ("distill_ppl_ratio", "<=", 0.92, "KD+CE student vs CE-only, held-out perplexity"),
    (
        "best_bytes_fraction_within_1pct",
        "<=",
        0.25,
        "smallest storage within 1% of top-64 float16's student / its bytes",
    ),
    (
        "fidelity_best_sampled_ppl_ratio",
        "<",
        1.0,
        "best sampled or head+tail student / top-64 float16's, perplexity",
    ),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    merged = {"machine": machine(), "quick": args.quick}
    start = time.time()
    for script in SCRIPTS:
        command = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {script}", flush=True)
        run = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        print(run.stdout, end="", flush=True)
        last = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 or not last:
            merged[f"{script}_failed"] = run.returncode
            continue
        result = json.loads(last[-1])
        result.pop("bench", None)
        merged.update(result)
    merged["seconds"] = time.time() - start
    rows = []
    for key, op, bound, what in TARGETS:
        value = merged.get(key)
        compare = (
            {">=": value >= bound, "<=": value <= bound, "<": value < bound}
            if value is not None
            else {}
        )
        met = value is not None and compare[op]
        rows.append(
            [
                what,
                value if value is not None else "n/a",
                f"{op} {bound:g}",
                "met" if met else "NOT met",
            ]
        )
        merged[f"{key}_target_met"] = met
    table(
        f"Targets on {merged['machine']} ({merged['seconds']:.0f} s)",
        ["measure", "value", "target", ""],
        rows,
    )
    emit(merged)


if __name__ == "__main__":
    main()
