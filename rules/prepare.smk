# Dataset -> token ids + shard plan; all teacher and data checks before any GPU work.
# One job per segment: the first plan ({segment} empty), then each append.


rule prepare:
    input:
        teacher=teacher_input,
        # Not by its timestamp: rows appended to a file must not rerun the segments
        # before them. plan_the_shards compares the data by content and dates back the
        # plans of the segments whose rows changed.
        dataset=ancient(dataset_input),
    output:
        tokens=str(LAYOUT.segment_tokens("{segment}")),
        plan=str(LAYOUT.segment_plan("{segment}")),
    log:
        LAYOUT.prepare_log_pattern,
    wildcard_constraints:
        segment=r"(/segment_\d{4})?",
    conda:
        "../envs/workflow.yaml"
    threads: config["tokenize"]["num_proc"]
    params:
        # Only what changes the stored numbers: editing GPUs or batch sizes reruns nothing.
        settings=prepare_settings,
        num_shards=segment_shard_count,
        segment=segment_rows,
    script:
        "../workflow_scripts/prepare.py"
