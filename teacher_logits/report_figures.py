"""The figures of ``snakemake --report``, drawn from manifest.json.

Everything comes from the manifest gather wrote (provenance and one-pass
statistics), so drawing needs matplotlib only: no HDF5 pass, no torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .disk import human_bytes
from .run_stats import claims_of, group_label, group_summary

log = logging.getLogger("report_figures")

FIGURES = ("timeline", "throughput", "topk_mass", "entropy", "next_token", "storage")
DPI = 110
GENERATION_COLOR = "#3b75af"
LOAD_COLOR = "#f0a35e"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"font.size": 10, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3}
    )
    return plt


def _time_unit(span_seconds: float) -> tuple[float, str]:
    if span_seconds > 3 * 3600:
        return 3600.0, "hours"
    if span_seconds > 180:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _group_colors(labels):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _shard_axis(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("shard")


def _legend_above(ax, **kwargs):
    ax.legend(
        loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, borderaxespad=0.2, **kwargs
    )


def _note(ax, text):
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, wrap=True
    )
    ax.set_axis_off()


def timeline(manifest: dict, path: str) -> None:
    plt = _pyplot()
    shards = manifest["shards"]
    bars = []  # (group, start, end, load_seconds, shard index)
    for shard in shards:
        claims = claims_of(shard)
        for number, claim in enumerate(claims):
            if claim.get("started_at") is None or claim.get("finished_at") is None:
                continue
            # Only the claim that finished the shard has a measured teacher load.
            load = shard.get("teacher_load_seconds") if number == len(claims) - 1 else None
            bars.append(
                (
                    group_label(claim.get("cuda_visible_devices"), claim.get("hostname")),
                    claim["started_at"],
                    claim["finished_at"],
                    load or 0.0,
                    shard["index"],
                )
            )
    groups = sorted({b[0] for b in bars})
    height = min(2.0 + 0.45 * len(groups), 24.0)
    fig, ax = plt.subplots(figsize=(10, height))
    if not bars:
        _note(ax, "no shard recorded start and finish times")
    else:
        t0 = min(b[1] for b in bars)
        span = max(b[2] for b in bars) - t0
        scale, unit = _time_unit(span)
        row = {g: i for i, g in enumerate(groups)}
        for group, start, end, load, index in bars:
            y = row[group]
            x0, width = (start - t0) / scale, (end - start) / scale
            load_w = min(load, end - start) / scale
            ax.barh(
                y, load_w, left=x0, height=0.6, color=LOAD_COLOR, edgecolor="white", linewidth=0.5
            )
            ax.barh(
                y,
                width - load_w,
                left=x0 + load_w,
                height=0.6,
                color=GENERATION_COLOR,
                edgecolor="white",
                linewidth=0.5,
            )
            if width > span / scale / 40:
                ax.text(
                    x0 + width / 2,
                    y,
                    str(index),
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=8,
                )
        ax.set_yticks(range(len(groups)), groups)
        ax.invert_yaxis()
        ax.set_xlabel(f"time since the first shard started ({unit})")
        ax.set_ylabel("GPU group (host:devices)")
        ax.grid(axis="y", visible=False)
        from matplotlib.patches import Patch

        _legend_above(
            ax,
            ncol=2,
            handles=[
                Patch(color=LOAD_COLOR, label="teacher load"),
                Patch(color=GENERATION_COLOR, label="generation (label: shard)"),
            ],
        )
    ax.set_title(f"Shard timeline: {len(shards)} shards on {len(groups)} GPU group(s)", loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def throughput(manifest: dict, path: str) -> None:
    plt = _pyplot()
    shards = manifest["shards"]
    groups = group_summary(shards)
    colors = _group_colors([g["group"] for g in groups])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    speeds = [
        (
            s["index"],
            s.get("tokens_per_second"),
            group_label(s.get("cuda_visible_devices"), s.get("hostname")),
        )
        for s in shards
    ]
    known = [(i, v, g) for i, v, g in speeds if v]
    if known:
        left.bar(
            [i for i, _, _ in known],
            [v for _, v, _ in known],
            width=0.8,
            color=[colors[g] for _, _, g in known],
        )
        _shard_axis(left)
        left.set_ylabel("tokens/s (generation, teacher load excluded)")
        left.set_title("Tokens/s per shard (color: GPU group)")
    else:
        _note(left, "shards carry no generation time")
    with_speed = [g for g in groups if g["tokens_per_second"]]
    if with_speed:
        ys = range(len(with_speed))
        right.barh(
            ys,
            [g["tokens_per_second"] for g in with_speed],
            color=[colors[g["group"]] for g in with_speed],
        )
        right.set_yticks(ys, [g["group"] for g in with_speed])
        right.invert_yaxis()
        for y, g in zip(ys, with_speed):
            right.text(g["tokens_per_second"], y, f" {g['shards']} shards", va="center", fontsize=8)
        right.set_xlabel("tokens/s")
        right.set_title("Tokens/s per GPU group")
        right.margins(x=0.25)
    else:
        _note(right, "no GPU group timing")
    overall = manifest["stats"].get("throughput", {}).get("tokens_per_second")
    if overall:
        fig.suptitle(
            f"Overall {overall:,.0f} tokens/s of wall time with any job running "
            f"({manifest['num_tokens']:,} tokens)",
            fontsize=11,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _histogram(ax, hist: dict, mean: float | None, xlabel: str, color: str):
    edges, counts = hist["bin_edges"], hist["counts"]
    total = max(sum(counts), 1)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(
        edges[:-1],
        [100 * c / total for c in counts],
        width=widths,
        align="edge",
        color=color,
        edgecolor="white",
        linewidth=0.5,
    )
    if mean is not None:
        ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend(loc="upper left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of tokens (%)")


# What the top-k figures say for a store without a top-k.
NO_TOP_K = "No top-k: a `sampled` store (generation.mode) keeps draws from the whole distribution"


def topk_mass(manifest: dict, path: str) -> None:
    plt = _pyplot()
    stats = manifest["stats"]
    fig, ax = plt.subplots(figsize=(8, 4))
    if not manifest["top_k"]:
        _note(ax, NO_TOP_K)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        return
    _histogram(
        ax,
        stats["topk_mass_histogram"],
        stats["mean_topk_mass"],
        f"probability mass in the teacher's top-{manifest['top_k']} (0 to 1)",
        GENERATION_COLOR,
    )
    ax.set_xlim(0, 1)
    ax.set_title(
        f"How much of the distribution the top-{manifest['top_k']} captured "
        f"({manifest['num_tokens']:,} tokens)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def entropy(manifest: dict, path: str) -> None:
    plt = _pyplot()
    stats = manifest["stats"]
    hist = stats.get("entropy_histogram")
    fig, ax = plt.subplots(figsize=(8, 4))
    if not hist:
        _note(ax, "No entropy stored: the shards were written with generation.store_entropy=false")
    else:
        _histogram(
            ax,
            hist,
            stats.get("mean_entropy_nats"),
            "entropy of the teacher's full next-token distribution (nats)",
            "#59a14f",
        )
        ax.set_xlim(0, hist["bin_edges"][-1])
        ax.set_title(
            f"Exact per-token entropy (upper end: ln(vocabulary {manifest['vocab_size']:,}) "
            f"= {hist['bin_edges'][-1]:.2f} nats, uniform)"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def next_token(manifest: dict, path: str) -> None:
    plt = _pyplot()
    shards = manifest["shards"]
    overall = manifest["stats"]["next_token_in_topk_fraction"]
    fig, ax = plt.subplots(figsize=(8, 4))
    values = [(s["index"], s.get("next_token_in_topk_fraction")) for s in shards]
    values = [(i, v) for i, v in values if v is not None]
    if not manifest["top_k"]:
        _note(ax, NO_TOP_K)
        values = []
    if values:
        ax.bar([i for i, _ in values], [100 * v for _, v in values], width=0.8, color="#b07aa1")
    ax.axhline(
        100 * overall,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"all shards {100 * overall:.1f}%",
    )
    ax.set_ylim(0, 100)
    _shard_axis(ax)
    ax.set_ylabel("next token in the top-k (% of tokens)")
    ax.set_title(f"Actual next token inside the teacher's top-{manifest['top_k']}", loc="left")
    _legend_above(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def storage(manifest: dict, path: str) -> None:
    plt = _pyplot()
    stats, shards = manifest["stats"], manifest["shards"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    per_token = [(s["index"], s["bytes"] / max(s["num_tokens"], 1)) for s in shards]
    left.bar([i for i, _ in per_token], [v for _, v in per_token], width=0.8, color="#76b7b2")
    raw = stats.get("uncompressed_bytes_per_token")
    if raw:
        left.axhline(
            raw, color="black", linestyle="--", linewidth=1, label=f"uncompressed {raw:.0f}"
        )
        _legend_above(left)
    _shard_axis(left)
    left.set_ylabel("bytes per token on disk")
    left.set_title("Bytes per token per shard", loc="left")
    parts = sorted(stats.get("dataset_bytes", {}).items(), key=lambda item: -item[1])
    if parts:
        names = [name for name, _ in parts]
        sizes = [size for _, size in parts]
        right.barh(range(len(names)), [size / 1e6 for size in sizes], color="#9c755f")
        right.set_yticks(range(len(names)), names)
        right.invert_yaxis()
        total = max(sum(sizes), 1)
        for y, size in enumerate(sizes):
            right.text(
                size / 1e6,
                y,
                f" {human_bytes(size)} ({100 * size / total:.0f}%)",
                va="center",
                fontsize=8,
            )
        right.set_xlabel("MB on disk, all shards (compressed)")
        right.set_title("Where the bytes go")
        right.margins(x=0.35)
    else:
        _note(right, "no per-dataset sizes in the manifest")
    fig.suptitle(
        f"Storage: {human_bytes(stats['total_bytes'])} in {len(shards)} shards + "
        f"{human_bytes(stats.get('index_bytes', 0))} index; {stats['bytes_per_token']:.1f} bytes/token",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def draw_all(manifest_path: str, outputs: dict) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    drawers = {
        "timeline": timeline,
        "throughput": throughput,
        "topk_mass": topk_mass,
        "entropy": entropy,
        "next_token": next_token,
        "storage": storage,
    }
    for name in FIGURES:
        Path(outputs[name]).parent.mkdir(parents=True, exist_ok=True)
        drawers[name](manifest, outputs[name])
        log.info("wrote %s", outputs[name])
