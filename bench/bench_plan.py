"""Planning benchmark (6 of bench/README.md): ``snakemake -n`` on this workflow vs
bare Snakemake on a DAG of the same shape (prepare -> N generate -> gather).

    python bench/bench_plan.py [--quick] [--sizes 100 1000 10000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Timer, emit, machine, table  # noqa: E402

BARE = """
N = int(config["num_shards"])


rule all:
    input:
        "out/index.h5",


rule prepare:
    output:
        "out/prepared/tokens.h5",
    shell:
        "touch {output}"


rule generate:
    input:
        "out/prepared/tokens.h5",
    output:
        "out/shards/shard_{shard}.h5",
    shell:
        "touch {output}"


rule gather:
    input:
        expand("out/shards/shard_{shard}.h5", shard=[f"{i:05d}" for i in range(N)]),
    output:
        "out/index.h5",
    shell:
        "touch {output}"
"""


def snakemake() -> str:
    return str(Path(sys.executable).with_name("snakemake"))


def plan_seconds(folder: Path, shards: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            subprocess.run(
                [snakemake(), "-n", "--cores", "1", "--config", f"num_shards={shards}"],
                cwd=folder,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        best = min(best, t.seconds)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10000])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    ours, bare = work / "workflow", work / "bare"
    ours.mkdir()
    for name in (
        "Snakefile",
        "rules",
        "config",
        "workflow_scripts",
        "teacher_logits",
        "report",
        "profiles",
        "envs",
    ):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, ours / name)
    bare.mkdir()
    (bare / "Snakefile").write_text(BARE)
    rows, result = [], {"bench": "plan", "machine": machine()}
    for shards in args.sizes:
        repeats = 1 if args.quick or shards >= 10000 else 2
        ours_s, bare_s = plan_seconds(ours, shards, repeats), plan_seconds(bare, shards, repeats)
        rows.append([shards, ours_s, bare_s, ours_s / bare_s])
        result[f"plan_seconds_{shards}"] = ours_s
        result[f"bare_plan_seconds_{shards}"] = bare_s
        result[f"plan_ratio_{shards}"] = ours_s / bare_s
    table(
        f"snakemake -n on {machine()} (best of runs)",
        ["shards", "workflow s", "bare s", "ratio"],
        rows,
    )
    emit(result)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
