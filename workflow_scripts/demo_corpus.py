"""Rule ``demo_corpus``: the embedded demo's text corpus, built offline."""

from teacher_logits.demo import build_corpus
from teacher_logits.job import run_job


def main():
    build_corpus(snakemake.output.corpus, snakemake.config["demo"]["num_documents"])


run_job("demo_corpus", snakemake.log[0], main)
