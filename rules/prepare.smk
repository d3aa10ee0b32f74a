# Dataset -> token ids + shard plan; all teacher and data checks before any GPU work.


rule prepare:
    input:
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
    params:
        # Only what changes the stored numbers: editing GPUs or batch sizes reruns nothing.
        settings=meaning_settings_json(config),
        num_shards=config["num_shards"],
    script:
        "../workflow_scripts/prepare.py"
