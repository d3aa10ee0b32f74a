"""Rule ``distill``: train a KD+CE and a CE-only student, score both on held-out samples."""

import json

from teacher_logits.distill import DistillSettings, draw_figure, run_distill
from teacher_logits.job import run_job


def main():
    settings = DistillSettings.from_config(snakemake.config, threads=snakemake.threads)
    result = run_distill(settings)
    with open(snakemake.output.result, "w") as handle:
        json.dump(result, handle, indent=2)
    draw_figure(result, snakemake.output.figure)


run_job("distill", snakemake.log[0], main)
