"""Fidelity per byte: what each storage setting costs on disk and what its student learns.

One teacher run on the demo stores the top-64 in float32 plus 16 draws from the tail
beyond it (``generation.mode: topk+sampled``). Every setting is made from that run,
written with the real shard writer and read back with the real reader:

- top-k cuts, float16 and int8 values, top-p: re-encodings of the top-64 (as the
  issue asks: no second teacher run);
- ``sampled`` and ``top-k + tail`` draws: exact draws from the whole softmax (or from
  the tail beyond k), built from the top-64's known probabilities plus the stored tail
  draws, with the generation code's counter-based choice stream. Draw j picks "beyond
  the top-64" with the tail's mass and then takes tail draw j, so every draw follows
  the teacher exactly (the same construction as the tensor engine's merge).

Bytes/token are the written shards' sizes (all datasets, input ids included) at the
demo's 2k vocabulary and at the 128k proxy (a) of bench_store.py. Students are the
distill benchmark's (same steps, seed, held-out ids, full-vocabulary KL to the
recomputed teacher), at ce_weight 0.5 and 0, beside two CE-only students whose spread
is the noise the 1% bar must clear. The baseline is lossless top-64 float16.

    python bench/bench_fidelity.py --quick   # ~10 minutes on 2 cores (600 steps)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_logits import LogitStore  # noqa: E402
from teacher_logits.generation.writing import rows_in_stored_dtypes  # noqa: E402
from teacher_logits.sampling import (  # noqa: E402
    CHOICE_STREAM,
    SampleSettings,
    counts_from_draws,
    row_keys,
    uniforms,
)
from teacher_logits.store.reader import read_sample  # noqa: E402
from teacher_logits.store.writer import ShardWriter  # noqa: E402

from common import BENCH_SHARD_ATTRS, REPO, Timer, demo_assets, emit, machine, proxy_maps, table  # noqa: E402

SOURCE_K, SOURCE_DRAWS = 64, 16


@dataclass(frozen=True)
class Setting:
    name: str
    top_k: int
    value_dtype: str = "float16"
    top_p: float | None = None
    samples: int = 0
    # Students: at ce_weight 0.5 (all) and 0 (``pure``).
    pure: bool = False

    @property
    def mode(self) -> str:
        if not self.samples:
            return "topk"
        return "topk+sampled" if self.top_k else "sampled"


BASELINE = Setting("top-64 float16", 64, pure=True)
SETTINGS = [
    BASELINE,
    Setting("top-64 int8", 64, "int8"),
    Setting("top-16 float16", 16),
    Setting("top-8 int8", 8, "int8"),
    Setting("top-p 0.95 int8", 64, "int8", top_p=0.95),
    Setting("sampled 16", 0, samples=16, pure=True),
    Setting("sampled 8", 0, samples=8),
    Setting("top-8 int8 + tail 16", 8, "int8", samples=16, pure=True),
    Setting("top-4 int8 + tail 8", 4, "int8", samples=8),
    # At k <= 4, int8's two float32 scales per row cost more than float16's values save.
    Setting("top-4 float16 + tail 8", 4, samples=8),
    Setting("top-2 float16 + tail 8", 2, samples=8),
]


def teacher_run(work: Path, demo: Path, max_samples: int | None) -> Path:
    """The demo through the workflow: top-64 float32 plus 16 tail draws per position."""
    config = {
        "output_dir": str(work / "source"),
        "demo": {"dir": str(demo)},
        "generation": {"top_k": SOURCE_K, "mode": "topk+sampled", "samples": SOURCE_DRAWS},
        "storage": {"value_dtype": "float32"},
        "dataset": {"max_samples": max_samples},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    command = [snakemake, "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2"]
    run = subprocess.run(
        [*command, "--configfile", str(work / "config.yaml")], capture_output=True, text=True
    )
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:])
        raise SystemExit("the teacher run failed")
    return work / "source"


def load_rows(store_dir: Path) -> dict:
    """Every row of the store, concatenated in sample order, with the tail draws expanded
    to a sequence of SOURCE_DRAWS per row (all 0 where the tail underflowed)."""
    with LogitStore(store_dir) as store:
        records = [store[i] for i in range(len(store))]
        vocab = int(store.vocab_size)
    rows = {
        name: np.concatenate([r[name] for r in records])
        for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp", "entropy")
    }
    ids = np.concatenate([r["sampled_ids"] for r in records])
    counts = np.concatenate([r["sampled_counts"] for r in records]).astype(np.int64)
    rows["tail_valid"] = counts.sum(axis=1) == SOURCE_DRAWS
    draws = np.zeros(counts.shape, np.int64)
    draws[rows["tail_valid"]] = np.repeat(ids.ravel(), counts.ravel()).reshape(-1, SOURCE_DRAWS)
    rows["sample_ids"] = np.array([r["sample_id"] for r in records], np.int64)
    rows["lengths"] = np.array([len(r["input_ids"]) for r in records], np.int64)
    # Expanded from counts, each row's draws are in id order: shuffle them (seeded per
    # row) so that the first n of them are n iid draws, not the n smallest ids.
    offsets = np.concatenate([[0], np.cumsum(rows["lengths"])])
    shuffle = np.argsort(uniforms(row_keys(rows["sample_ids"], offsets), SOURCE_DRAWS, 0x5A5A), 1)
    rows["tail_draws"] = np.take_along_axis(draws, shuffle, 1)
    rows["vocab"] = vocab
    return rows


def draws_beyond(rows: dict, k: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` exact draws per row from the teacher's softmax outside its top-k: ranks
    k..63 with their known probabilities, or the mass beyond the top-64 (tail draw j)."""
    probs = np.exp(rows["topk_logits"].astype(np.float64) - rows["logsumexp"][:, None])
    beyond = np.clip(1.0 - probs.sum(axis=1), 0.0, None) * rows["tail_valid"]
    weights = np.concatenate([probs[:, k:], beyond[:, None]], axis=1)
    total = weights.sum(axis=1)
    cdf = np.cumsum(weights, axis=1) / np.where(total > 0, total, 1.0)[:, None]
    offsets = np.concatenate([[0], np.cumsum(rows["lengths"])])
    choice = uniforms(row_keys(rows["sample_ids"], offsets), samples, CHOICE_STREAM)
    pick = np.empty(choice.shape, np.int64)
    for j in range(samples):  # one column at a time: N x 65 floats, not N x S x 65
        pick[:, j] = (cdf[:, :-1] <= choice[:, j : j + 1]).sum(axis=1)
    listed = SOURCE_K - k
    from_list = (
        np.take_along_axis(rows["topk_ids"][:, k:], np.minimum(pick, listed - 1), 1)
        if listed
        else 0
    )
    drawn = np.where(pick < listed, from_list, rows["tail_draws"][:, :samples])
    return counts_from_draws(drawn, total > 0)


def setting_rows(rows: dict, setting: Setting) -> dict:
    out = {"logsumexp": rows["logsumexp"], "entropy": rows["entropy"]}
    if setting.top_k:
        out["topk_ids"] = rows["topk_ids"][:, : setting.top_k]
        out["topk_logits"] = rows["topk_logits"][:, : setting.top_k]
    if setting.samples:
        out["sampled_ids"], out["sampled_counts"] = draws_beyond(
            rows, setting.top_k, setting.samples
        )
    return out


def write_setting(path: Path, rows: dict, setting: Setting, derived: dict) -> float:
    """The setting's rows through the generate job's dtype step and the shard writer;
    returns the file's bytes per token."""
    offsets = np.concatenate([[0], np.cumsum(rows["lengths"])])
    sampling = SampleSettings(setting.mode, setting.samples or 16, 1.0) if setting.samples else None
    writer = ShardWriter(
        path,
        len(rows["lengths"]),
        int(offsets[-1]),
        setting.top_k,
        value_dtype=setting.value_dtype,
        sampling=sampling,
    )
    writer.add_samples(rows["sample_ids"], rows["lengths"])
    stored = rows_in_stored_dtypes(
        derived, SimpleNamespace(value_dtype=setting.value_dtype, top_p=setting.top_p)
    )
    step = 1 << 14
    for r0 in range(0, int(offsets[-1]), step):
        block = {name: values[r0 : r0 + step] for name, values in stored.items()}
        writer.write_rows({**block, "input_ids": rows["input_ids"][r0 : r0 + step]})
    writer.commit(BENCH_SHARD_ATTRS)
    return path.stat().st_size / int(offsets[-1])


def big_vocab_rows(derived: dict, vocab: int) -> dict:
    """The setting's rows at the 128k proxy (a) of bench_store.py: every id through its
    random injective map, each row's draws sorted again by their new ids."""
    id_map = proxy_maps(vocab)["128k random (a)"].astype(np.int64)
    out = dict(derived)
    if "topk_ids" in out:
        out["topk_ids"] = id_map[out["topk_ids"]].astype(np.int32)
    if "sampled_ids" in out:
        used = out["sampled_counts"] > 0
        ids = np.where(used, id_map[out["sampled_ids"]], np.iinfo(np.int64).max)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, 1)
        counts = np.take_along_axis(out["sampled_counts"], order, 1)
        out["sampled_ids"] = np.where(counts > 0, ids, 0).astype(np.int32)
        out["sampled_counts"] = counts
    return out


class ShardStore:
    """One written shard as the distill helpers read a store (``store[i]``, in order)."""

    def __init__(self, path: Path, vocab: int):
        self.handle = h5py.File(path, "r", locking=False)
        self.offsets = self.handle["offsets"][:]
        self.sample_ids = self.handle["sample_ids"][:]
        self.vocab_size, self.temperatures = vocab, [1.0]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict:
        return read_sample(self.handle, int(i), self.offsets)


def train_and_score(job: dict) -> dict:
    """One student in its own process (one thread): trained, then scored held out."""
    import torch
    from transformers import AutoModelForCausalLM

    from teacher_logits.distill import DistillSettings, HeldOut, holdout_mask, train_student

    torch.set_num_threads(1)
    store = ShardStore(Path(job["shard"]), job["vocab"])
    settings = DistillSettings(
        store_dir=Path(job["shard"]).parent,
        teacher_path=Path(job["teacher"]),
        steps=job["steps"],
        ce_weight=job["ce_weight"],
        seed=job["seed"],
        threads=1,
    )
    held = holdout_mask(store.sample_ids, settings.holdout_fraction)
    teacher = AutoModelForCausalLM.from_pretrained(settings.teacher_path, dtype=torch.float32)
    teacher.eval()
    heldout = HeldOut(store, np.flatnonzero(held), settings, teacher)
    with Timer() as timer:
        model = train_student(store, np.flatnonzero(~held), settings, job["kd"], lambda m, s: None)
    return {**job, **heldout.score(model, with_kl=True), "train_seconds": timer.seconds}


def draw_figure(results: list[dict], baseline: dict, ce: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    fig, ax = plt.subplots(figsize=(8, 5))
    for weight, marker in ((0.5, "o"), (0.0, "s")):
        points = [r for r in results if r["ce_weight"] == weight]
        ax.scatter(
            [r["bytes"] for r in points],
            [r["perplexity"] for r in points],
            marker=marker,
            label=f"KD, ce_weight {weight}",
        )
        # Neighbours by size alternate above and below, so close points stay readable.
        for n, r in enumerate(sorted(points, key=lambda r: r["bytes"])):
            ax.annotate(
                r["setting"],
                (r["bytes"], r["perplexity"]),
                fontsize=7,
                xytext=(3, 4 if n % 2 else -10),
                textcoords="offset points",
            )
    bar = baseline["perplexity"] * 1.01
    ax.axhline(bar, color="grey", ls=":", label="top-64 float16 (ce 0.5) + 1%")
    # CE-only sits far above every KD student: named in the legend, not drawn.
    ax.plot([], [], " ", label=f"CE only: {np.mean([c['perplexity'] for c in ce]):.1f}")
    ppl = [r["perplexity"] for r in results]
    ax.set_ylim(min(ppl) - 1, max(ppl) + 1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([15, 20, 30, 50, 100, 150], labels=["15", "20", "30", "50", "100", "150"])
    ax.set(xlabel="bytes per token on disk (2k vocabulary)", ylabel="student held-out perplexity")
    ax.set_title("Fidelity per byte (demo, same steps and seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="accepted; the run is the same")
    parser.add_argument("--steps", type=int, default=600, help="student steps (distill's default)")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "img" / "fidelity.png")
    parser.add_argument("--max-samples", type=int, default=None, help="demo documents (all)")
    args = parser.parse_args(argv)
    demo = demo_assets()
    with tempfile.TemporaryDirectory(prefix="bench_fidelity_") as tmp:
        work = Path(tmp)
        with Timer() as teacher_time:
            rows = load_rows(teacher_run(work, demo, args.max_samples))
        vocab = rows["vocab"]
        sizes, shards = {}, {}
        for setting in SETTINGS:
            derived = setting_rows(rows, setting)
            shards[setting.name] = work / f"{setting.name.replace(' ', '_')}.h5"
            small = write_setting(shards[setting.name], rows, setting, derived)
            big = write_setting(work / "big.h5", rows, setting, big_vocab_rows(derived, vocab))
            sizes[setting.name] = (small, big)
        jobs = []
        common = {"vocab": vocab, "teacher": str(demo / "teacher"), "steps": args.steps}
        for setting in SETTINGS:
            for weight in (0.5, 0.0) if setting.pure else (0.5,):
                jobs.append(
                    {
                        **common,
                        "setting": setting.name,
                        "shard": str(shards[setting.name]),
                        "ce_weight": weight,
                        "seed": 0,
                        "kd": True,
                    }
                )
        for seed in (0, 1):
            jobs.append(
                {
                    **common,
                    "setting": f"CE only, seed {seed}",
                    "shard": str(shards[BASELINE.name]),
                    "ce_weight": 1.0,
                    "seed": seed,
                    "kd": False,
                }
            )
        with Timer() as student_time, ProcessPoolExecutor(2) as pool:
            done = list(pool.map(train_and_score, jobs))
    kd = [
        {**r, "bytes": sizes[r["setting"]][0], "bytes_128k": sizes[r["setting"]][1]}
        for r in done
        if r["kd"]
    ]
    ce = [r for r in done if not r["kd"]]
    baseline = next(r for r in kd if r["setting"] == BASELINE.name and r["ce_weight"] == 0.5)
    base_bytes = sizes[BASELINE.name]
    spread = abs(ce[0]["perplexity"] - ce[1]["perplexity"]) / ce[0]["perplexity"]
    rows_out = [
        [
            r["setting"],
            r["ce_weight"],
            r["bytes"],
            r["bytes"] / base_bytes[0],
            r["bytes_128k"],
            r["bytes_128k"] / base_bytes[1],
            r["perplexity"],
            r["perplexity"] / baseline["perplexity"] - 1,
            r["kl_to_teacher"],
        ]
        for r in sorted(kd, key=lambda r: (-r["ce_weight"], r["bytes"]))
    ]
    rows_out += [
        [
            r["setting"],
            1.0,
            "",
            "",
            "",
            "",
            r["perplexity"],
            r["perplexity"] / baseline["perplexity"] - 1,
            r["kl_to_teacher"],
        ]
        for r in ce
    ]
    table(
        f"Held-out perplexity and KL vs bytes/token ({args.steps} steps, seed 0) on {machine()}",
        [
            "setting",
            "ce_w",
            "B/token 2k",
            "x top-64 f16",
            "B/token 128k",
            "x top-64 f16",
            "perplexity",
            "vs top-64 f16",
            "KL to teacher",
        ],
        rows_out,
    )
    within = [
        r for r in kd if r["ce_weight"] == 0.5 and r["perplexity"] <= baseline["perplexity"] * 1.01
    ]
    best = min(within, key=lambda r: r["bytes"])
    drawn = {setting.name for setting in SETTINGS if setting.samples}
    top64_at = {r["ce_weight"]: r for r in kd if r["setting"] == BASELINE.name}
    beats = [
        r
        for r in kd
        if r["setting"] in drawn and r["perplexity"] < top64_at[r["ce_weight"]]["perplexity"]
    ]
    ratios = {}
    for weight, key in ((0.5, "ce05"), (0.0, "ce0")):
        top64 = next(r for r in kd if r["setting"] == BASELINE.name and r["ce_weight"] == weight)
        ratios[f"fidelity_best_sampled_ppl_ratio_{key}"] = min(
            r["perplexity"] / top64["perplexity"]
            for r in kd
            if r["setting"] in drawn and r["ce_weight"] == weight
        )
    print(
        f"\n1% bar: perplexity <= {baseline['perplexity'] * 1.01:.2f}; CE-only seed-to-seed spread "
        f"{spread:.1%}. Smallest within 1%: {best['setting']} at {best['bytes']:.1f} B/token, "
        f"{best['bytes'] / base_bytes[0]:.1%} of top-64 float16 (target <= 25%). Sampled or "
        f"head+tail settings beating top-64 at the same ce_weight: "
        f"{[(r['setting'], r['ce_weight']) for r in beats] or 'none'}. "
        f"Teacher run {teacher_time.seconds:.0f} s, {len(jobs)} students {student_time.seconds:.0f} s."
    )
    draw_figure(kd, baseline, ce, args.figure)
    print(f"figure: {args.figure}")
    emit(
        {
            "bench": "fidelity",
            "best_bytes_per_token_within_1pct": best["bytes"],
            "best_bytes_fraction_within_1pct": best["bytes"] / base_bytes[0],
            "best_setting_within_1pct": best["setting"],
            "fidelity_baseline_bytes_per_token": base_bytes[0],
            "fidelity_baseline_bytes_per_token_128k": base_bytes[1],
            "fidelity_baseline_ppl": baseline["perplexity"],
            "fidelity_ce_seed_spread": spread,
            "fidelity_beats_top64": [[r["setting"], r["ce_weight"]] for r in beats],
            # Best drawn setting / top-64 float16, at each ce_weight both were trained at;
            # the headline is the better of the two.
            **ratios,
            "fidelity_best_sampled_ppl_ratio": min(ratios.values()),
            "fidelity_ce_ppl": [r["perplexity"] for r in ce],
            "fidelity_results": [
                {
                    k: r[k]
                    for k in (
                        "setting",
                        "ce_weight",
                        "bytes",
                        "bytes_128k",
                        "perplexity",
                        "kl_to_teacher",
                    )
                }
                for r in kd
            ],
        }
    )


if __name__ == "__main__":
    main()
