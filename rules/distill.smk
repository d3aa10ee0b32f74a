# The student proof: `snakemake --cores 2 distill` trains a small student with and
# without the store and compares them on held-out samples. Not in the default target.


rule distill:
    input:
        index=rules.gather.output.index,
        manifest=rules.gather.output.manifest,
        teacher=teacher_input,
    output:
        result=str(LAYOUT.distill_result),
        figure=report(
            str(LAYOUT.distill_figure),
            category="4. Student",
            caption="../report/distill.rst",
            labels={"figure": "student trained from the store vs CE only"},
        ),
    log:
        str(LAYOUT.log("distill")),
    conda:
        "../envs/workflow.yaml"
    threads: 2
    script:
        "../workflow_scripts/distill.py"
