"""Does the store make a better student? The ``distill`` rule on the demo, as a ratio.

Builds the demo store and runs ``snakemake distill`` (a KD+CE student and a CE-only
student, same seed, same batches, same steps), then trains one more CE-only
student with another seed: how far two CE-only students land apart is the noise
the ratio must clear.

    python bench/bench_distill.py            # about 6 minutes on 2 cores
    python bench/bench_distill.py --quick    # the same: the bound is stated at 600 steps

Target: the KD student's held-out perplexity at most 0.92x the CE-only student's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_logits.distill import DistillSettings, run_distill  # noqa: E402

from common import REPO, Timer, demo_assets, emit, machine, table  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="accepted; the run is the same")
    parser.parse_args(argv)
    demo = demo_assets()
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        work = Path(tmp)
        config = {"output_dir": str(work / "store"), "demo": {"dir": str(demo)}}
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        command = [
            str(Path(sys.executable).with_name("snakemake")),
            "distill",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(work),
            "--cores",
            "2",
            "--configfile",
            str(work / "config.yaml"),
        ]
        with Timer() as workflow:
            run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:])
            raise SystemExit("snakemake distill failed")
        result = json.loads((work / "store" / "distill" / "distill.json").read_text())
        fields = {f.name for f in dataclasses.fields(DistillSettings)}
        saved = {k: v for k, v in result["settings"].items() if k in fields}
        paths = {name: Path(saved[name]) for name in ("store_dir", "teacher_path")}
        settings = DistillSettings(**{**saved, **paths, "seed": 1})
        with Timer() as other_seed:
            second = run_distill(settings, students=("ce_only",))
    kd, ce = result["students"]["kd_ce"], result["students"]["ce_only"]
    ce_again = second["students"]["ce_only"]
    spread = abs(ce_again["perplexity"] - ce["perplexity"]) / ce["perplexity"]
    rows = [
        ["teacher", result["teacher"]["perplexity"], 0.0, ""],
        [
            "KD + CE (ce_weight 0.5, bucket)",
            kd["perplexity"],
            kd["kl_to_teacher"],
            kd["train_seconds"],
        ],
        ["CE only, seed 0", ce["perplexity"], ce["kl_to_teacher"], ce["train_seconds"]],
        [
            "CE only, seed 1",
            ce_again["perplexity"],
            ce_again["kl_to_teacher"],
            ce_again["train_seconds"],
        ],
    ]
    steps = result["settings"]["steps"]
    table(
        f"Held-out ({result['heldout_samples']} samples, {result['heldout_tokens']} tokens), "
        f"{steps} steps on {machine()}",
        ["model", "perplexity", "KL to teacher", "train s"],
        rows,
    )
    print(
        f"\nKD/CE perplexity ratio {result['ppl_ratio']:.3f} (target <= 0.92); CE-only "
        f"seed-to-seed spread {spread:.1%}; workflow {workflow.seconds:.0f} s "
        f"(store + 2 students), third student {other_seed.seconds:.0f} s"
    )
    emit(
        {
            "bench": "distill",
            "distill_ppl_ratio": result["ppl_ratio"],
            "distill_ce_seed_spread": spread,
            "distill_kd_ppl": kd["perplexity"],
            "distill_ce_ppl": ce["perplexity"],
            "distill_teacher_ppl": result["teacher"]["perplexity"],
            "distill_kl_ratio": kd["kl_to_teacher"] / ce["kl_to_teacher"],
        }
    )


if __name__ == "__main__":
    main()
