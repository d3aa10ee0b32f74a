"""Shared pieces of the benchmarks: a bench teacher, a length-skewed dataset, a
prepared shard on disk, timers and the table + JSON output every script prints.

Benchmarks are scripts, not tests: they print numbers and never fail on them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from teacher_logits.layout import RunLayout  # noqa: E402
from teacher_logits.store.prepared import PreparedTokens, write_prepared  # noqa: E402

DEMO_DIR = Path(os.environ.get("TEACHER_LOGITS_DEMO_DIR", REPO / "resources" / "demo"))
# Naive storage at k=64: int32 ids + float16 values, plus the float32 logsumexp.
NAIVE_BYTES_PER_TOKEN = 64 * 4 + 64 * 2 + 4


def id_floor_bytes_per_token(vocab: int, k: int = 64) -> float:
    """Bytes per token of a uniformly random k-id subset of ``vocab``: log2(C(vocab, k)) / 8."""
    import math

    bits = (math.lgamma(vocab + 1) - math.lgamma(k + 1) - math.lgamma(vocab - k + 1)) / math.log(2)
    return bits / 8


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def bench_teacher(
    path: Path, layers: int = 8, hidden: int = 512, vocab: int = 32000, dtype: str = "float32"
) -> Path:
    """A random-weight Llama shaped like a real LM (the body dominates), saved once."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    return path


def skewed_lengths(num_tokens: int, max_length: int, seed: int = 0, low: int = 20) -> np.ndarray:
    """Log-normal sample lengths from ~``low`` to ``max_length``, ``num_tokens`` in all."""
    rng = np.random.default_rng(seed)
    mu = np.log(low) + (np.log(max_length) - np.log(low)) / 3
    lengths = []
    while sum(lengths) < num_tokens:
        lengths.append(int(np.clip(rng.lognormal(mu, 0.9), low, max_length)))
    return np.array(lengths, dtype=np.int64)


def demo_assets(demo_dir: Path = DEMO_DIR) -> Path:
    """The workflow's demo corpus and teacher, built as its demo rules build them (once)."""
    from teacher_logits.demo import build_corpus, build_teacher

    corpus, teacher = demo_dir / "corpus.jsonl", demo_dir / "teacher"
    if not corpus.exists():
        demo_dir.mkdir(parents=True, exist_ok=True)
        build_corpus(str(corpus), 2000)
    if not (teacher / "config.json").exists():
        print(f"building the demo teacher in {teacher} (once, about 2 minutes)", flush=True)
        build_teacher(str(corpus), str(teacher), train_steps=300, threads=2)
    return demo_dir


def prepared_shard(
    layout: RunLayout,
    lengths: np.ndarray,
    vocab: int,
    top_k: int,
    seed: int = 0,
    num_shards: int = 1,
    input_ids: np.ndarray | None = None,
    teacher: Path | None = None,
) -> RunLayout:
    """prepare's files (tokens, plan, regenerate token) in ``layout`` for ``lengths`` samples;
    with ``teacher``, its fingerprints, which a generate job checks before it loads it."""
    layout.prepared_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if input_ids is None:
        input_ids = rng.integers(3, vocab, int(offsets[-1])).astype(np.int32)
    bounds = np.linspace(0, len(lengths), num_shards + 1).astype(np.int64)
    write_prepared(
        layout.tokens,
        PreparedTokens(
            sample_ids=np.arange(len(lengths), dtype=np.int64),
            offsets=offsets,
            input_ids=input_ids,
            shard_bounds=bounds,
        ),
    )
    plan = {
        "num_shards": num_shards,
        "num_rows": len(lengths),
        "num_samples": len(lengths),
        "num_tokens": int(offsets[-1]),
        "top_k": top_k,
        "vocab_size": vocab,
        "teacher_fingerprint": "bench",
        "tokenizer_fingerprint": "bench",
        "config_fingerprint": "bench",
        "dropped": [],
        "truncated_samples": 0,
        "settings": {"storage": {"value_dtype": "float16"}, "generation": {"store_entropy": True}},
        "shards": [
            {
                "index": i,
                "num_samples": int(bounds[i + 1] - bounds[i]),
                "num_tokens": int(offsets[bounds[i + 1]] - offsets[bounds[i]]),
            }
            for i in range(num_shards)
        ],
    }
    if teacher is not None:
        from teacher_logits.fingerprints import teacher_fingerprint, tokenizer_fingerprint

        plan["teacher_fingerprint"] = teacher_fingerprint(teacher)
        plan["tokenizer_fingerprint"] = tokenizer_fingerprint(teacher)
    layout.plan.write_text(json.dumps(plan))
    layout.regenerate_token.write_text("bench\n")
    return layout


def workflow_config(
    teacher: Path,
    top_k: int = 64,
    batch_tokens: int = 4096,
    threads: int = 2,
    compression: str = "default",
    commit_every_s: float = 60.0,
) -> dict:
    """The config a generate job sees, with the defaults of config/config.yaml."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["teacher"].update(path=str(teacher), dtype="float32")
    config["generation"].update(
        top_k=top_k, batch_tokens=batch_tokens, threads=threads, commit_every_s=commit_every_s
    )
    config["storage"]["compression"] = compression
    config["gpus"] = ""
    # What the Snakefile resolves `auto` to outside a cluster executor.
    config["gpu_assignment"] = "local"
    return config


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def emit(result: dict) -> None:
    """The script's result as one JSON line (run_all.py reads the last line)."""
    print(json.dumps(result, sort_keys=True), flush=True)


# One forward of the bench teacher on a [batch, width] batch, in a fresh process, with
# or without the KV cache: the growth of peak memory (CPU: VmHWM after resetting it;
# CUDA: max_memory_allocated) and the bytes of the cache the forward returned.
KV_CACHE_PROBE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
teacher, device, batch, width, use_cache = {teacher!r}, {device!r}, {batch}, {width}, {use_cache}
torch.set_num_threads({threads})
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(device).eval()
ids = torch.randint(3, model.config.vocab_size, (batch, width), device=device)
mask = torch.ones_like(ids)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with torch.inference_mode():
    model.model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
    out = model.model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
    if device == "cuda":
        torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = status("VmHWM") - before
    cache = out.past_key_values
    layers = getattr(cache, "layers", []) if cache is not None else []
    cache_bytes = sum(t.nbytes for layer in layers for t in (layer.keys, layer.values))
print(json.dumps({{"peak_bytes": peak, "cache_bytes": cache_bytes}}))
"""


def kv_cache_probe(teacher: Path, device: str, batch: int, width: int, threads: int) -> dict:
    """Peak memory of one forward with the KV cache the pipeline used to build and without
    it (as every forward now runs), each in its own process."""
    runs = {}
    for use_cache in (True, False):
        code = KV_CACHE_PROBE.format(
            teacher=str(teacher),
            device=device,
            batch=batch,
            width=width,
            use_cache=use_cache,
            threads=threads,
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        runs[use_cache] = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "tokens": batch * width,
        "peak_with_cache_bytes": runs[True]["peak_bytes"],
        "peak_without_cache_bytes": runs[False]["peak_bytes"],
        "saved_bytes": runs[True]["peak_bytes"] - runs[False]["peak_bytes"],
        "cache_bytes": runs[True]["cache_bytes"],
    }


# The attributes a shard written outside a run gets (the writer requires them).
BENCH_SHARD_ATTRS = {
    "shard_index": 0,
    "num_shards": 1,
    "teacher_fingerprint": "bench",
    "tokenizer_fingerprint": "bench",
    "config_fingerprint": "bench",
    "cuda_visible_devices": "",
    "hostname": "",
    "started_at": 0.0,
    "finished_at": 0.0,
    "versions": {},
    "claims": [],
}

# A Llama-3-sized vocabulary for the proxies of real vocabularies.
BIG_VOCAB = 128256


def proxy_maps(vocab: int) -> dict:
    """Two injective maps of a ``vocab``-token vocabulary into 128,256 ids: (a) a fixed
    random map (pessimistic: no frequency order), (b) ids spread in order plus a fixed
    jitter, as a BPE vocabulary keeps frequent tokens low."""
    spread = BIG_VOCAB // vocab
    random_map = np.random.default_rng(0).choice(BIG_VOCAB, vocab, replace=False)
    ordered_map = np.arange(vocab) * BIG_VOCAB // vocab + np.random.default_rng(1).integers(
        0, spread, vocab
    )
    assert len(np.unique(ordered_map)) == vocab and ordered_map.max() < BIG_VOCAB
    return {"128k random (a)": random_map, "128k ordered (b)": ordered_map}


def vocab_proxies(rows, vocab: int) -> dict:
    """The demo rows at ``vocab`` (2k) and at the two 128,256-token proxies of the same
    rows (``proxy_maps``)."""
    out = {f"{vocab:,}": rows}
    for name, mapping in proxy_maps(vocab).items():
        out[name] = {**rows, "topk_ids": mapping.astype(np.int32)[rows["topk_ids"]]}
    return out
