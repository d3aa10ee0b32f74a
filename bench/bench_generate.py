"""Generation benchmarks (1-3 of bench/README.md): pipeline vs floor, vs a naive
script, and the memory of the top-k step.

    python bench/bench_generate.py [--quick] [--device cpu|cuda]

Floor and pipeline run alternately in this one process on the same teacher,
samples, batch plan and thread count, so they share whatever else loads the
machine; the best of each is reported.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

# This folder (for common) and the repository (for teacher_logits), before any import
# of either: the benchmarks run from a plain checkout.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from teacher_logits.generation.batching import padding_fraction, plan_batches, windows  # noqa: E402
from teacher_logits.generation.provenance import library_versions  # noqa: E402
from teacher_logits.generation.shard_job import WINDOW_BATCHES, generate  # noqa: E402
from teacher_logits.layout import RunLayout  # noqa: E402
from teacher_logits.settings import GenerateSettings  # noqa: E402
from teacher_logits.store.format import read_attrs  # noqa: E402
from teacher_logits.store.prepared import read_prepared  # noqa: E402

from common import (  # noqa: E402
    Timer,
    bench_teacher,
    emit,
    kv_cache_probe,
    machine,
    prepared_shard,
    skewed_lengths,
    table,
    workflow_config,
)


def padded(batch, input_ids, offsets, pad_id):
    import torch

    lengths = offsets[batch + 1] - offsets[batch]
    ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(batch):
        start, stop = offsets[sample], offsets[sample + 1]
        ids[row, : stop - start] = torch.from_numpy(input_ids[start:stop].astype(np.int64))
        mask[row, : stop - start] = 1
    return ids, mask


def floor_run(head, input_ids, offsets, batch_tokens, top_k):
    """The model's forward + topk + logsumexp on the pipeline's own batches: no copies, no I/O."""
    import torch

    lengths = np.diff(offsets)
    device = head.input_device
    with torch.inference_mode(), Timer() as timer:
        for w0, w1 in windows(lengths, WINDOW_BATCHES * batch_tokens):
            sub = offsets[w0 : w1 + 1] - offsets[w0]
            window_ids = input_ids[offsets[w0] : offsets[w1]]
            for batch in plan_batches(np.diff(sub), batch_tokens):
                ids, mask = padded(batch, window_ids, sub, 0)
                ids, mask = ids.to(device), mask.to(device)
                out = head.body(input_ids=ids, attention_mask=mask, use_cache=False)
                rows = out.last_hidden_state[mask.bool()]
                for start in range(0, rows.shape[0], head.chunk_rows):
                    logits = head.head(rows[start : start + head.chunk_rows]).float()
                    torch.topk(logits, top_k, dim=-1)
                    torch.logsumexp(logits, dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return timer.seconds


def pipeline_run(config, folder, prepared: RunLayout, index):
    """The generate job: prepared tokens in -> shard on disk; minus the teacher load."""
    run = RunLayout(folder / f"run_{index}")
    run.output_dir.mkdir(parents=True)
    run.prepared_dir.symlink_to(prepared.prepared_dir.resolve())
    settings = GenerateSettings.from_config(config, threads=int(config["generation"]["threads"]))
    with Timer() as timer:
        generate(settings, run, 0)
    with h5py.File(run.shard(0), "r") as f:
        load = float(read_attrs(f)["teacher_load_seconds"])
    return timer.seconds - load, load


def naive_run(model, input_ids, offsets, top_k, path, max_samples):
    """The common hand-written script: batches of 4 in dataset order, full float32 logits."""
    import torch

    rows_written = 0
    with torch.inference_mode(), h5py.File(path, "w") as f, Timer() as timer:
        ids_ds = f.create_dataset("topk_ids", (0, top_k), maxshape=(None, top_k), dtype=np.int32)
        val_ds = f.create_dataset(
            "topk_logits", (0, top_k), maxshape=(None, top_k), dtype=np.float16
        )
        lse_ds = f.create_dataset("logsumexp", (0,), maxshape=(None,), dtype=np.float32)
        for b0 in range(0, max_samples, 4):
            batch = np.arange(b0, min(b0 + 4, max_samples))
            ids, mask = padded(batch, input_ids, offsets, 0)
            ids, mask = ids.to(model.device), mask.to(model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            values, top = torch.topk(logits, top_k, dim=-1)
            lse = torch.logsumexp(logits, dim=-1)
            keep = mask.bool().cpu()
            top, values, lse = top.cpu()[keep], values.cpu()[keep], lse.cpu()[keep]
            n = len(lse)
            for ds, data in (
                (ids_ds, top.numpy().astype(np.int32)),
                (val_ds, values.numpy().astype(np.float16)),
                (lse_ds, lse.numpy()),
            ):
                ds.resize(rows_written + n, axis=0)
                ds[rows_written:] = data
            rows_written += n
    return timer.seconds, rows_written


MEMORY_PROBE = r"""
import sys, torch
sys.path.insert(0, {repo!r})
from teacher_logits.generation.topk import Reduction, reduce_rows
torch.set_num_threads(1)
vocab, hidden, rows, chunk_bytes = {vocab}, {hidden}, {rows}, {chunk_bytes}
head = torch.nn.Linear(hidden, vocab, bias=False)
reduction = Reduction.of(64, vocab, chunk_bytes)
x = torch.randn(rows, hidden)
with torch.inference_mode():
    torch.topk(torch.randn(4, vocab), 64)  # warm up kernels, not the step's buffers
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    before = status("VmRSS")
    out = reduce_rows(x, head, reduction, "cpu")
    after = status("VmHWM")
print(after - before)
"""


def memory_probe(rows, vocab=32000, hidden=512, chunk_bytes=32 << 20):
    code = MEMORY_PROBE.format(
        repo=str(Path(__file__).resolve().parents[1]),
        vocab=vocab,
        hidden=hidden,
        rows=rows,
        chunk_bytes=chunk_bytes,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--work", default=None, help="folder for the teacher and files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    cuda = args.device == "cuda"
    threads = 4 if cuda else min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_generate_"))
    if cuda:  # ~1.1B parameters (TinyLlama's shape), bfloat16
        teacher = bench_teacher(work / "teacher", layers=22, hidden=2048, dtype="bfloat16")
    else:
        teacher = bench_teacher(work / "teacher")
    top_k, max_length = 64, 2048 if cuda or not args.quick else 512
    num_tokens = (400_000 if cuda else 8_000) if args.quick else (2_000_000 if cuda else 60_000)
    batch_tokens = 32768 if cuda else 4096
    repeats = 2 if args.quick else 3
    lengths = skewed_lengths(num_tokens, max_length)
    prepared_run = prepared_shard(
        RunLayout(work / "prepared"), lengths, 32000, top_k, teacher=teacher
    )
    try:
        import hdf5plugin  # noqa: F401

        compression = "default"
    except ImportError:  # the GPU machine may lack it: a fast filter h5py has built in
        compression = "lzf"
    config = workflow_config(
        teacher, top_k=top_k, batch_tokens=batch_tokens, threads=threads, compression=compression
    )
    if cuda:
        config["teacher"]["dtype"] = "bfloat16"
        config["gpus"] = "0"
    prepared = read_prepared(prepared_run.tokens)
    _, offsets, input_ids = prepared.shard_slice(0)

    from teacher_logits.generation.engine import load_pipeline

    with Timer() as load_timer:
        head = load_pipeline(GenerateSettings.from_config(config, threads), on_gpu=cuda)
    floor_s, pipe_s, loads, plain_s = [], [], [], []
    plain = {**config, "generation": {**config["generation"], "store_entropy": False}}
    floor_run(head, input_ids, offsets[:40] - 0, batch_tokens, top_k)  # warm-up: kernels, caches
    for rep in range(repeats):
        floor_s.append(floor_run(head, input_ids, offsets, batch_tokens, top_k))
        seconds, load = pipeline_run(config, work / "runs", prepared_run, rep)
        pipe_s.append(seconds)
        loads.append(load)
        plain_s.append(pipeline_run(plain, work / "runs_plain", prepared_run, rep)[0])
    total = int(offsets[-1])
    floor_tps, pipe_tps = total / min(floor_s), total / min(pipe_s)
    plain_tps = total / min(plain_s)
    pad = padding_fraction(np.diff(offsets), plan_batches(np.diff(offsets), batch_tokens))

    # The naive script on the same samples (on the GPU, the first 400).
    naive_samples = min(len(lengths), 400) if cuda else len(lengths)
    naive_s, naive_rows = naive_run(
        head.model, input_ids, offsets, top_k, work / "naive.h5", naive_samples
    )
    naive_tps = naive_rows / naive_s

    # Memory of the top-k step: grows with rows only through the [rows, k] results.
    mem_rows = [] if cuda else [1024, 4096, 16384] if args.quick else [1024, 4096, 16384, 65536]
    memory = []
    for rows in mem_rows:
        peak = memory_probe(rows)
        full = rows * 32000 * 4
        results = rows * (64 * 8 + 8)
        memory.append(
            {"rows": rows, "peak_bytes": peak, "full_logits_bytes": full, "results_bytes": results}
        )

    # The KV cache no forward builds any more, at one full batch of the bench.
    width = 2048 if cuda else 512
    kv = kv_cache_probe(teacher, args.device, batch_tokens // width, width, threads)

    n_params = sum(p.numel() for p in head.model.parameters())
    table(
        f"Generation on {machine()} ({args.device}, {threads} threads); teacher: random Llama, "
        f"{n_params / 1e6:.0f}M parameters, vocab 32000; {total} tokens, lengths "
        f"{lengths.min()}-{lengths.max()} (mean {lengths.mean():.0f}), padding {pad:.1%}",
        ["run", "tokens/s", "ratio", "seconds (best)"],
        [
            ["floor: forward + topk + logsumexp", floor_tps, 1.0, min(floor_s)],
            [
                "pipeline: generate job, tokens -> shard",
                pipe_tps,
                pipe_tps / floor_tps,
                min(pipe_s),
            ],
            ["pipeline, store_entropy=false", plain_tps, plain_tps / floor_tps, min(plain_s)],
            ["naive: 4 per batch, full logits, h5py", naive_tps, naive_tps / floor_tps, naive_s],
        ],
    )
    print(f"  teacher load {np.median(loads):.2f} s (in the job), {load_timer.seconds:.2f} s here")
    table(
        "Top-k step memory: chunks of 32 MiB of float32 logits, vocab 32000, hidden 512",
        ["rows", "peak RSS growth MiB", "full logits MiB", "results MiB"],
        [
            [
                m["rows"],
                m["peak_bytes"] / 2**20,
                m["full_logits_bytes"] / 2**20,
                m["results_bytes"] / 2**20,
            ]
            for m in memory
        ],
    )
    table(
        f"KV cache: one forward of a full batch ({batch_tokens // width} x {width} tokens), "
        "peak memory growth in a fresh process",
        ["forward", "peak MiB", "cache MiB"],
        [
            [
                "use_cache=True (before)",
                kv["peak_with_cache_bytes"] / 2**20,
                kv["cache_bytes"] / 2**20,
            ],
            ["use_cache=False (now)", kv["peak_without_cache_bytes"] / 2**20, 0.0],
        ],
    )
    print(f"  saved: {kv['saved_bytes'] / 2**20:.1f} MiB of peak memory per batch")
    extra = {}
    if cuda:
        # Model FLOPs per token: 2 x parameters outside the embedding + attention.
        cfg = head.model.config
        dense = n_params - cfg.vocab_size * cfg.hidden_size
        attention = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * float(lengths.mean())
        peak = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
        name = torch.cuda.get_device_name()
        peak_flops = next((v for k, v in peak.items() if k in name), None)
        flops = (2 * dense + attention) * pipe_tps
        extra = {
            "gpu": name,
            "model_flops_per_s": flops,
            "mfu": flops / peak_flops if peak_flops else None,
            "floor_mfu": (2 * dense + attention) * floor_tps / peak_flops if peak_flops else None,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(),
            "versions": library_versions(),
            "compression": compression,
        }
        print(
            f"  {name}: MFU {extra['mfu'] or 0:.1%} (floor {extra['floor_mfu'] or 0:.1%}), peak GPU "
            f"memory {extra['peak_gpu_memory_bytes'] / 2**30:.1f} GiB; {extra['versions']}"
        )
    emit(
        {
            "bench": "generate",
            "machine": machine(),
            "device": args.device,
            "threads": threads,
            "teacher_params": n_params,
            "tokens": total,
            "padding_fraction": pad,
            "floor_tokens_per_s": floor_tps,
            "pipeline_tokens_per_s": pipe_tps,
            "floor_ratio": pipe_tps / floor_tps,
            "naive_tokens_per_s": naive_tps,
            "floor_ratio_without_entropy": plain_tps / floor_tps,
            "plain_seconds": plain_s,
            "naive_ratio": pipe_tps / naive_tps,
            "teacher_load_seconds": float(np.median(loads)),
            "floor_seconds": floor_s,
            "pipeline_seconds": pipe_s,
            "topk_memory": memory,
            "kv_cache": kv,
            "kv_cache_saved_bytes": kv["saved_bytes"],
            **extra,
        }
    )


if __name__ == "__main__":
    main()
