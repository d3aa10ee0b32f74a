"""The student proof: the held-out split, the settings, and `snakemake distill` end to end.

The ratio bound itself (KD+CE at most 0.92x CE-only perplexity at 600 steps) is a
benchmark, `bench/bench_distill.py`, not a test: here the run is short and the
assertions are the ones a short run settles.
"""

import json
import math

import numpy as np
import pytest

from teacher_logits.distill import DistillSettings, holdout_mask

from conftest import demo_workflow


def test_holdout_is_a_hash_of_the_id_alone():
    ids = np.arange(200_000, dtype=np.int64)
    held = holdout_mask(ids, 0.05)
    # 200k Bernoulli(0.05) draws: the standard deviation of the fraction is 0.0005.
    assert abs(held.mean() - 0.05) < 0.003
    # The same id is held out wherever it sits and whichever other ids exist.
    shuffled = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(holdout_mask(shuffled, 0.05), held[shuffled])
    assert np.array_equal(holdout_mask(ids[::7], 0.05), held[::7])
    # Not a stride or a range: held-out ids spread over the whole id space.
    assert held[:100_000].sum() > 0 and held[100_000:].sum() > 0
    assert not np.array_equal(held[:1000], held[1000:2000])


def test_settings_come_from_the_distill_section(tmp_path):
    config = {
        "output_dir": str(tmp_path / "out"),
        "teacher": {"path": str(tmp_path / "teacher")},
        "demo": {"dir": "resources/demo"},
        "distill": {"steps": 7, "ce_weight": 0.25, "tail": "renormalize"},
    }
    settings = DistillSettings.from_config(config, threads=3)
    assert (settings.steps, settings.ce_weight, settings.tail) == (7, 0.25, "renormalize")
    assert settings.threads == 3 and settings.batch_size == 16
    assert settings.store_dir == tmp_path / "out"


@pytest.mark.slow
def test_dry_run_plans_distill_only_when_asked(workflow):
    plain = workflow.run("-n", "--cores", "2")
    assert "rule distill:" not in plain.stdout
    asked = workflow.run("-n", "--cores", "2", "distill")
    assert "rule distill:" in asked.stdout and "rule gather:" in asked.stdout


@pytest.mark.slow
def test_distill_rule_trains_and_reports_two_students(tmp_path, demo_dir):
    wf = demo_workflow(tmp_path, demo_dir)
    config = {
        "gpus": "0",
        "allow_cpu": True,
        "num_shards": 2,
        "dataset": {"max_samples": 400},
        "generation": {"threads": 1, "batch_tokens": 4096},
        "distill": {"steps": 60, "eval_every": 30, "holdout_fraction": 0.1},
    }
    wf.run("--cores", "2", "distill", config=config)
    result = json.loads(wf.path("results/demo/distill/distill.json").read_text())
    assert set(result["students"]) == {"kd_ce", "ce_only"}
    assert result["train_samples"] + result["heldout_samples"] == 400 - len(
        wf.manifest()["dropped"]
    )
    for student in result["students"].values():
        assert [point["step"] for point in student["curve"]] == [30, 60]
        assert math.isfinite(student["perplexity"]) and student["perplexity"] > 1
        assert student["kl_to_teacher"] > 0
    # Trained on the teacher's own distributions, the KD student is closer to them
    # (after 60 steps the gap is several times any run-to-run difference).
    kd, ce = result["students"]["kd_ce"], result["students"]["ce_only"]
    assert kd["kl_to_teacher"] < ce["kl_to_teacher"]
    assert result["ppl_ratio"] == pytest.approx(kd["perplexity"] / ce["perplexity"])
    assert wf.path("results/demo/distill/distill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The figure is part of Snakemake's report when the report is asked for distill.
    wf.run("--report", "report.html", "distill", config=config)
    html = wf.path("report.html").read_text(errors="replace")
    assert "distill.png" in html and "4. Student" in html


@pytest.mark.slow
def test_example_training_script_runs_against_a_store(tmp_path):
    """examples/train_student.py on the checked-in store (made by an older version: no
    tokenizer copy, vocab_size from its manifest), two workers, a few steps."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    store = tmp_path / "store"
    shutil.copytree(REPO / "tests" / "data" / "store_v2", store)
    script = REPO / "examples" / "train_student.py"
    out = tmp_path / "student"
    args = ["--tiny", "--steps", "4", "--workers", "2", "--max-tokens", "512", "--holdout", "0.5"]
    result = subprocess.run(
        [sys.executable, str(script), str(store), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 4: held out {'perplexity': " in result.stdout and "'kl': " in result.stdout
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 2048
