# Validate every shard, then index them into one store with a manifest.


rule gather:
    input:
        plan=rules.prepare.output.plan,
        tokens=rules.prepare.output.tokens,
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
