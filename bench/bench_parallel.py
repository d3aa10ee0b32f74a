"""Pipeline vs tensor-parallel teacher on the same batches: tokens/s and peak memory
per device (bench/README.md, 8).

    python bench/bench_parallel.py [--quick] [--device cpu|cuda] [--ranks N]

Both engines run through the engine seam the generate job uses (``open_engine``), on
the same padded batches, one after the other in this process. On CUDA it needs
``--ranks`` GPUs (default 2): with fewer it says so, skips, and its JSON line says
``"skipped"``; run it with ``CUDA_VISIBLE_DEVICES`` narrowed to those GPUs (as
``gpu_check.sh`` does), or the pipeline spreads over every visible one. On CPU the
ranks are gloo processes sharing the same cores, so the ratio there measures the
engine's overhead, not a speedup.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from teacher_logits.generation.batching import plan_batches  # noqa: E402
from teacher_logits.generation.engine import open_engine  # noqa: E402
from teacher_logits.gpus import Claim  # noqa: E402
from teacher_logits.settings import GenerateSettings  # noqa: E402

from common import (  # noqa: E402
    Timer,
    bench_teacher,
    emit,
    machine,
    skewed_lengths,
    table,
    workflow_config,
)


def padded_batches(lengths, batch_tokens, vocab, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    batches = []
    for batch in plan_batches(lengths, batch_tokens):
        width = int(lengths[batch].max())
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(batch):
            n = int(lengths[sample])
            ids[row, :n] = torch.from_numpy(rng.integers(3, vocab, n))
            mask[row, :n] = 1
        batches.append((ids, mask))
    return batches


def run(settings, claim, batches, cuda: bool, ranks: int):
    """Tokens/s over ``batches`` (after one warm-up batch), peak memory per device, rows."""
    import torch

    if cuda:
        for device in range(ranks):
            torch.cuda.reset_peak_memory_stats(device)
    with open_engine(settings, claim) as engine:
        engine(*batches[0])
        outputs = []
        with Timer() as timer:
            for ids, mask in batches:
                outputs.append(engine(ids, mask))
    if not cuda:
        peaks = []
    elif settings.tensor_ranks > 1:
        peaks = list(engine.peak_gpu_bytes)
    else:
        peaks = [torch.cuda.max_memory_allocated(d) for d in range(ranks)]
    tokens = sum(int(mask.sum()) for _, mask in batches)
    return tokens / timer.seconds, peaks, outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the teacher")
    args = parser.parse_args(argv)
    import torch

    cuda = args.device == "cuda"
    found = torch.cuda.device_count() if cuda else args.ranks
    if found < args.ranks:
        print(
            f"bench_parallel: {found} GPU(s) here, tensor parallelism over {args.ranks} needs "
            f"{args.ranks}: skipped"
        )
        emit({"bench": "parallel", "skipped": f"{found} GPU(s), {args.ranks} needed"})
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_parallel_"))
    if cuda:  # the GPU check's teacher: ~1.1B parameters, bfloat16
        teacher = bench_teacher(work / "teacher", layers=22, hidden=2048, dtype="bfloat16")
        threads, batch_tokens, num_tokens = 4, 32768, 200_000 if args.quick else 1_000_000
    else:
        teacher = bench_teacher(work / "teacher", layers=4)
        threads, batch_tokens = min(2, os.cpu_count() or 1), 2048
        num_tokens = 6_000 if args.quick else 30_000
    lengths = skewed_lengths(num_tokens, 2048 if cuda else 512)
    batches = padded_batches(lengths, batch_tokens, 32000)
    results = {}
    # Tensor first: its job side never touches CUDA, so its ranks start on empty GPUs.
    for mode in ("tensor", "pipeline"):
        config = workflow_config(teacher, batch_tokens=batch_tokens, threads=threads)
        config.update(gpus=",".join(map(str, range(args.ranks))), gpus_per_model=args.ranks)
        config["allow_cpu"] = not cuda
        config["teacher"].update(parallel=mode, dtype="bfloat16" if cuda else "float32")
        settings = GenerateSettings.from_config(config, threads)
        claim = Claim(",".join(map(str, range(args.ranks))) if cuda else "", 0)
        results[mode] = run(settings, claim, batches, cuda, args.ranks)
    (pipe_tps, pipe_peaks, pipe_rows), (tp_tps, tp_peaks, tp_rows) = (
        results["pipeline"],
        results["tensor"],
    )
    lse_diff = max(
        float((a.logsumexp - b.logsumexp).abs().max()) for a, b in zip(pipe_rows, tp_rows)
    )
    gib = 2**30
    table(
        f"Pipeline vs tensor parallel over {args.ranks} {'GPUs' if cuda else 'CPU ranks'} on "
        f"{torch.cuda.get_device_name() if cuda else machine()}; {len(batches)} batches, "
        f"{sum(int(m.sum()) for _, m in batches):,} tokens, {threads} threads",
        ["engine", "tokens/s", "ratio", "peak memory per device GiB"],
        [
            ["pipeline", pipe_tps, 1.0, " / ".join(f"{p / gib:.2f}" for p in pipe_peaks) or "-"],
            [
                "tensor",
                tp_tps,
                tp_tps / pipe_tps,
                " / ".join(f"{p / gib:.2f}" for p in tp_peaks) or "-",
            ],
        ],
    )
    print(f"  largest |logsumexp| difference between the engines: {lse_diff:.2e}")
    emit(
        {
            "bench": "parallel",
            "device": args.device,
            "machine": torch.cuda.get_device_name() if cuda else machine(),
            "ranks": args.ranks,
            "parallel_pipeline_tokens_per_s": pipe_tps,
            "parallel_tensor_tokens_per_s": tp_tps,
            "tensor_vs_pipeline_tokens_ratio": tp_tps / pipe_tps,
            "parallel_pipeline_peak_bytes_per_device": pipe_peaks,
            "parallel_tensor_peak_bytes_per_device": tp_peaks,
            "parallel_max_logsumexp_difference": lse_diff,
        }
    )


if __name__ == "__main__":
    main()
