# Figures for `snakemake --report report.html`, drawn from gather's manifest.


# A few seconds of plotting: on a cluster it runs on the head node, not as a job.
localrules:
    report_figures,


rule report_figures:
    input:
        manifest=rules.gather.output.manifest,
    output:
        timeline=report(
            str(LAYOUT.report_figure("timeline")),
            category="1. Run",
            caption="../report/timeline.rst",
            labels={"figure": "timeline per GPU group"},
        ),
        throughput=report(
            str(LAYOUT.report_figure("throughput")),
            category="1. Run",
            caption="../report/throughput.rst",
            labels={"figure": "tokens/s per shard and group"},
        ),
        topk_mass=report(
            str(LAYOUT.report_figure("topk_mass")),
            category="2. Teacher fidelity",
            caption="../report/topk_mass.rst",
            labels={"figure": "top-k probability mass"},
        ),
        entropy=report(
            str(LAYOUT.report_figure("entropy")),
            category="2. Teacher fidelity",
            caption="../report/entropy.rst",
            labels={"figure": "per-token entropy"},
        ),
        next_token=report(
            str(LAYOUT.report_figure("next_token")),
            category="2. Teacher fidelity",
            caption="../report/next_token.rst",
            labels={"figure": "next token in top-k"},
        ),
        storage=report(
            str(LAYOUT.report_figure("storage")),
            category="3. Storage",
            caption="../report/storage.rst",
            labels={"figure": "bytes per token and totals"},
        ),
    log:
        str(LAYOUT.log("report_figures")),
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/report_figures.py"
