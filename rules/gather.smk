# Validate every shard, then index them into one store with a manifest.


rule gather:
    input:
        plan=rules.prepare.output.plan,
        tokens=rules.prepare.output.tokens,
        shards=all_shards,
    output:
        index=out("index.h5"),
        manifest=out("manifest.json"),
    log:
        out("logs", "gather.log"),
    conda:
        "../environment.yml"
    # Shards are validated in this many worker processes (scaled down to --cores).
    threads: 4
    script:
        "../workflow_scripts/gather.py"
