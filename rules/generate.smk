# One job per shard: claim a GPU group, run the teacher, write the shard atomically.


# Writing a token is no work for a cluster job: the head does it.
localrules:
    regenerate_request,


rule regenerate_request:
    output:
        token=str(LAYOUT.regenerate_token),
    log:
        str(LAYOUT.log("regenerate_request")),
    conda:
        "../envs/workflow.yaml"
    params:
        token=regenerate_token(),
    shell:
        "echo {params.token} > {output.token:q} 2> {log:q}"


rule generate:
    input:
        unpack(own_segment),
        regenerate=rules.regenerate_request.output.token,
    output:
        shard=str(LAYOUT.shard("{shard}")),
    log:
        str(LAYOUT.log("generate", "{shard}")),
    benchmark:
        str(LAYOUT.benchmark("generate", "{shard}"))
    wildcard_constraints:
        shard=r"\d{5}",
    conda:
        "../envs/workflow.yaml"
    threads: config["generation"]["threads"]
    resources:
        gpu=DEVICES.gpus_per_job,
        # Under SLURM: --cpus-per-task=threads (the plugin's default for GPU jobs
        # would ask threads CPUs per GPU). No effect on a local run.
        cpus_per_task=config["generation"]["threads"],
    script:
        "../workflow_scripts/generate.py"
