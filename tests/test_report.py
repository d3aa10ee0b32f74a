"""The run report: gather's statistics in manifest.json, the figures, and Snakemake's
HTML report as a browser renders it (headless Chromium, when installed).

Set UPDATE_REPORT_SCREENSHOTS=1 to refresh the README's screenshots in docs/img/.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from teacher_logits.row_bytes import CROSS_FIELD_BYTES

from chromium import Chromium, find_chromium
from conftest import REPO, Workflow, demo_workflow

RUN = {
    "gpus": "0,1",
    "gpus_per_model": 1,
    "allow_cpu": True,
    "num_shards": 4,
    "generation": {"threads": 1, "batch_tokens": 2048},
    "dataset": {"max_samples": 120},
}
FIGURES = {  # file name -> (report category, label shown in its results table)
    "timeline.png": ("1. Run", "timeline per GPU group"),
    "throughput.png": ("1. Run", "tokens/s per shard and group"),
    "topk_mass.png": ("2. Teacher fidelity", "top-k probability mass"),
    "entropy.png": ("2. Teacher fidelity", "per-token entropy"),
    "next_token.png": ("2. Teacher fidelity", "next token in top-k"),
    "storage.png": ("3. Storage", "bytes per token and totals"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_dir) -> Workflow:
    root = tmp_path_factory.mktemp("report")
    wf = demo_workflow(root, demo_dir)
    wf.run("--cores", "2", config=RUN)
    return wf


@pytest.mark.slow
def test_manifest_holds_the_report_statistics(finished_run):
    manifest = finished_run.manifest()
    stats, shards = manifest["stats"], manifest["shards"]
    total = manifest["num_tokens"]
    # Histograms count every token once, on the bin edges they carry.
    assert sum(stats["topk_mass_histogram"]["counts"]) == total
    entropy = stats["entropy_histogram"]
    assert sum(entropy["counts"]) == entropy["num_tokens"] == total
    assert entropy["bin_edges"][0] == 0 and entropy["bin_edges"][-1] == pytest.approx(
        np.log(manifest["vocab_size"])
    )
    assert 0 < stats["mean_entropy_nats"] < entropy["bin_edges"][-1]
    # Storage: per-dataset bytes add up to at most the files; compression beats raw rows.
    assert stats["total_bytes"] == sum(s["bytes"] for s in shards)
    assert 0 < sum(stats["dataset_bytes"].values()) <= stats["total_bytes"]
    assert {"topk_ids", "topk_logits", "logsumexp", "entropy", "input_ids"} <= stats[
        "dataset_bytes"
    ].keys()
    assert (
        stats["bytes_per_token"]
        < stats["uncompressed_bytes_per_token"]
        == 4 + 64 * 6 + 4 + 2 + CROSS_FIELD_BYTES
    )
    assert stats["index_bytes"] > 0
    # Provenance per shard, and throughput per GPU group.
    for shard in shards:
        assert shard["generation_seconds"] > 0 and shard["teacher_load_seconds"] > 0
        assert shard["tokens_per_second"] == pytest.approx(
            shard["num_tokens"] / shard["generation_seconds"]
        )
        assert shard["job_started_at"] <= shard["claims"][-1]["started_at"] <= shard["finished_at"]
        assert 0 < shard["next_token_in_topk_fraction"] <= 1 and 0 < shard["mean_topk_mass"] <= 1
    groups = stats["throughput"]["groups"]
    assert {g["group"].split(":")[-1] for g in groups} == {"0", "1"}
    assert sum(g["shards"] for g in groups) == 4 and sum(g["tokens"] for g in groups) == total
    assert stats["throughput"]["tokens_per_second"] > 0


@pytest.mark.slow
def test_figures_are_pngs_for_every_report_entry(finished_run):
    for name in FIGURES:
        data = finished_run.path("results/demo/report", name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


@pytest.mark.slow
def test_report_renders_every_figure_in_chromium(finished_run, tmp_path):
    result = finished_run.run("--report", "report.html", config=RUN)
    report = finished_run.path("report.html")
    assert report.exists(), result.stderr[-2000:]
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    shots = REPO / "docs" / "img" if os.environ.get("UPDATE_REPORT_SCREENSHOTS") == "1" else None
    with Chromium(browser, width=1280, height=760) as page:
        for name, (category, label) in FIGURES.items():
            # A fresh page per figure, then click the way a reader does: category, then the eye.
            page.open(report.as_uri())
            page.wait_for(
                "document.querySelector('#app') && document.querySelector('#app').innerText"
                ".includes('RESULTS')",
                what="the report's menu",
            )
            menu = page.evaluate("document.querySelector('#app').innerText")
            assert category in menu
            page.evaluate(_click_link(category))
            page.wait_for(f"document.body.innerText.includes({json.dumps(label)})", what=label)
            clicked = page.evaluate(f"""(() => {{
                const row = [...document.querySelectorAll('tr')].find(
                    r => r.innerText.trim().startsWith({json.dumps(label)}));
                if (!row) return false;
                row.querySelector('a[iconname=eye]').click();
                return true; }})()""")
            assert clicked, f"no results row for {label}"
            # The figure is shown as a decoded PNG in the rendered page.
            size = page.wait_for(
                """(() => { const img = [...document.querySelectorAll('img')].find(
                       i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0);
                   return img ? [img.naturalWidth, img.naturalHeight] : null; })()""",
                what=f"the {name} image",
            )
            assert size[0] > 400 and size[1] > 200
            # The rendered DOM holds this very figure (its data URI names the file).
            assert re.search(
                r'<img src="data:image/png;[^"]*filename=' + re.escape(name) + ";base64,",
                page.dom(),
            ), name
            if shots is not None:
                _save_small_screenshot(page, shots / f"report_{name}")


def _click_link(text: str) -> str:
    return (
        f"[...document.querySelectorAll('a')].filter(a => a.innerText.trim() === {json.dumps(text)})"
        ".forEach(a => a.click())"
    )


def _save_small_screenshot(page, path: Path) -> None:
    """A README-sized screenshot: scaled down and palette-quantized to stay small in git."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw.png")
    page.screenshot(str(raw))
    image = Image.open(raw).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    image.quantize(colors=128).save(path, optimize=True)
    raw.unlink()
