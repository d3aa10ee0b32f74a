"""Rule ``generate``: claim a GPU group, run the teacher over one shard, write it atomically."""

from teacher_logits.generation.shard_job import generate
from teacher_logits.job import run_job
from teacher_logits.layout import RunLayout
from teacher_logits.settings import GenerateSettings


def main():
    settings = GenerateSettings.from_config(snakemake.config, threads=snakemake.threads)
    generate(settings, RunLayout(snakemake.config["output_dir"]), int(snakemake.wildcards.shard))


run_job("generate", snakemake.log[0], main)
