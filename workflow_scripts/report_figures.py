"""Rule ``report_figures``: the figures of ``snakemake --report``, from manifest.json."""

from teacher_logits.job import run_job
from teacher_logits.report_figures import FIGURES, draw_all


def main():
    draw_all(snakemake.input.manifest, {name: snakemake.output[name] for name in FIGURES})


run_job("report_figures", snakemake.log[0], main)
