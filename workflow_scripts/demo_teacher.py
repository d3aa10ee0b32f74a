"""Rule ``demo_teacher``: the embedded demo's small trained teacher, built offline."""

from teacher_logits.demo import build_teacher
from teacher_logits.job import run_job


def main():
    build_teacher(
        snakemake.input.corpus,
        snakemake.output.teacher,
        train_steps=snakemake.config["demo"]["train_steps"],
        threads=snakemake.threads,
    )


run_job("demo_teacher", snakemake.log[0], main)
