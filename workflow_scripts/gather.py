"""Rule ``gather``: validate every shard, then write ``index.h5`` and ``manifest.json``."""

from teacher_logits.config import teacher_path
from teacher_logits.gather import gather
from teacher_logits.job import run_job
from teacher_logits.layout import RunLayout


def main():
    gather(
        RunLayout(snakemake.config["output_dir"]),
        workers=snakemake.threads,
        tokenizer_source=teacher_path(snakemake.config),
    )


run_job("gather", snakemake.log[0], main)
