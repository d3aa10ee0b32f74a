"""Fingerprint cost: what checking the teacher's weights by content costs, against
loading them.

Every run (at plan time) and every generate job fingerprint the teacher's weights
(``teacher_content_digest``: 4 KiB at the start, middle and end of every tensor). This
measures it on a Llama-shaped safetensors file against reading the same file with
``safetensors`` (what loading costs at least), and against a full SHA-256.

    python bench/bench_fingerprint.py [--quick]

Page cache: both warm (the file was just written and read). As root, cold numbers
too (``/proc/sys/vm/drop_caches`` before each measurement).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_logits.fingerprints import (  # noqa: E402
    file_sha256,
    teacher_content_digest,
    teacher_fingerprint,
)

from common import Timer, emit, machine, table  # noqa: E402


def llama_shaped_weights(path: Path, hidden: int, layers: int, vocab: int) -> int:
    """A float16 safetensors file with a Llama layer's tensors per layer."""
    rng = np.random.default_rng(0)
    mlp = int(hidden * 2.75)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        for name in ("gate_proj", "up_proj"):
            shapes[f"{p}mlp.{name}.weight"] = (mlp, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, mlp)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    tensors = {
        n: rng.standard_normal(s, dtype=np.float32).astype(np.float16) for n, s in shapes.items()
    }
    save_file(tensors, path, metadata={"format": "pt"})
    return len(tensors)


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(folder: Path, cold: bool) -> dict:
    weights = folder / "model.safetensors"
    steps = {
        "load (safetensors, whole file)": lambda: load_file(weights),
        "teacher_content_digest": lambda: teacher_content_digest(folder),
        "teacher_fingerprint": lambda: teacher_fingerprint(folder),
        "full sha256": lambda: file_sha256(weights),
    }
    seconds = {}
    for name, step in steps.items():
        if cold:
            drop_caches()
        else:
            step()  # warm
        with Timer() as timer:
            step()
        seconds[name] = timer.seconds
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    hidden, layers, vocab = (2048, 8, 32000) if args.quick else (4096, 8, 128256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text("{}")
        num_tensors = llama_shaped_weights(folder / "model.safetensors", hidden, layers, vocab)
        size = (folder / "model.safetensors").stat().st_size
        runs = {"warm": measure(folder, cold=False)}
        if drop_caches():
            runs["cold"] = measure(folder, cold=True)
    result = {"bench": "fingerprint", "machine": machine(), "weights_bytes": size}
    rows = []
    for cache, seconds in runs.items():
        load = seconds["load (safetensors, whole file)"]
        for name, value in seconds.items():
            rows.append([cache, name, value, value / load])
        result[f"teacher_content_digest_fraction_of_load_{cache}"] = (
            seconds["teacher_content_digest"] / load
        )
        result[f"full_sha256_fraction_of_load_{cache}"] = seconds["full sha256"] / load
    table(
        f"Fingerprinting {size / 2**30:.2f} GiB of weights in {num_tensors} tensors ({machine()})",
        ["page cache", "step", "seconds", "fraction of load"],
        rows,
    )
    result["teacher_content_digest_fraction_of_load"] = result[
        "teacher_content_digest_fraction_of_load_" + ("cold" if "cold" in runs else "warm")
    ]
    emit(result)


if __name__ == "__main__":
    main()
