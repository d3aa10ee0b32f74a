# Validate every shard, then index them into one store with a manifest.


rule gather:
    input:
        plans=segment_files(LAYOUT.segment_plan("{segment}")),
        tokens=segment_files(LAYOUT.segment_tokens("{segment}")),
        shards=all_shards,
    output:
        index=str(LAYOUT.index),
        manifest=str(LAYOUT.manifest),
    log:
        str(LAYOUT.log("gather")),
    conda:
        "../envs/workflow.yaml"
    # Shards are validated in this many worker processes (scaled down to --cores).
    threads: 4
    script:
        "../workflow_scripts/gather.py"
