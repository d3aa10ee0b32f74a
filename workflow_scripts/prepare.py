"""Rule ``prepare``: dataset -> token ids + shard plan, with every teacher and data check."""

from teacher_logits.job import run_job
from teacher_logits.layout import RunLayout
from teacher_logits.prepare import prepare
from teacher_logits.settings import PrepareSettings


def main():
    settings = PrepareSettings.from_config(snakemake.config, threads=snakemake.threads)
    prepare(settings, RunLayout(snakemake.config["output_dir"]), snakemake.params.segment)


run_job("prepare", snakemake.log[0], main)
