# One job per shard: claim a GPU group, run the teacher, write the shard atomically.


rule generate:
    input:
        tokens=rules.prepare.output.tokens,
        plan=rules.prepare.output.plan,
    output:
        shard=out("shards", "shard_{shard}.h5"),
    wildcard_constraints:
        shard=r"\d{5}",
    log:
        out("logs", "generate", "shard_{shard}.log"),
    benchmark:
        out("benchmarks", "generate", "shard_{shard}.tsv")
    threads: config["generation"]["threads"]
    resources:
        gpu=gpus_per_job(),
    script:
        "../workflow_scripts/generate.py"
