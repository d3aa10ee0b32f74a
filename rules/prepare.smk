# Dataset -> token ids + shard plan; all teacher and data checks before any GPU work.


rule prepare:
    input:
        # Rewritten when a setting, the teacher, tokenizer or data change by content.
        run_inputs=run_inputs_input,
        teacher=teacher_input,
        dataset=dataset_input,
    output:
        tokens=str(LAYOUT.tokens),
        plan=str(LAYOUT.plan),
    log:
        str(LAYOUT.log("prepare")),
    conda:
        "../envs/workflow.yaml"
    threads: config["tokenize"]["num_proc"]
    script:
        "../workflow_scripts/prepare.py"
