# Figures for `snakemake --report report.html`, drawn from gather's manifest.


# A few seconds of plotting: on a cluster it runs on the head node, not as a job.
localrules:
    report_figures,


rule report_figures:
    input:
        manifest=rules.gather.output.manifest,
    output:
        timeline=report(
            out("report", "timeline.png"),
            category="1. Run",
            caption="../report/timeline.rst",
            labels={"figure": "timeline per GPU group"},
        ),
        throughput=report(
            out("report", "throughput.png"),
            category="1. Run",
            caption="../report/throughput.rst",
            labels={"figure": "tokens/s per shard and group"},
        ),
        topk_mass=report(
            out("report", "topk_mass.png"),
            category="2. Teacher fidelity",
            caption="../report/topk_mass.rst",
            labels={"figure": "top-k probability mass"},
        ),
        entropy=report(
            out("report", "entropy.png"),
            category="2. Teacher fidelity",
            caption="../report/entropy.rst",
            labels={"figure": "per-token entropy"},
        ),
        next_token=report(
            out("report", "next_token.png"),
            category="2. Teacher fidelity",
            caption="../report/next_token.rst",
            labels={"figure": "next token in top-k"},
        ),
        storage=report(
            out("report", "storage.png"),
            category="3. Storage",
            caption="../report/storage.rst",
            labels={"figure": "bytes per token and totals"},
        ),
    log:
        out("logs", "report_figures.log"),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/report_figures.py"
