from snakemake.utils import min_version, validate

min_version("9.0")


include: "rules/common.smk"


configfile: checked_configfile("config/config.yaml")


report: "report/workflow.rst"


check_config_values(config, "config/schema.yaml")
validate(config, "config/schema.yaml")
DEVICES = check_config(config)
LAYOUT = RunLayout(config["output_dir"])
SHARD_PLAN = plan_the_shards(config, LAYOUT)


# Not in a dry run: planning never waits for or blocks a running workflow.
onstart:
    take_run_lock(config)
    discard_kept_work_of_forced_shards(config)


include: "rules/demo.smk"
include: "rules/prepare.smk"
include: "rules/generate.smk"
include: "rules/gather.smk"
include: "rules/report.smk"
include: "rules/distill.smk"


rule all:
    default_target: True
    input:
        # Listed too, so a plan lost to a failed prepare is made again (and every
        # shard checked against it), not left missing under an older store.
        segment_files(LAYOUT.segment_plan("{segment}")),
        rules.gather.output,
        rules.report_figures.output,
        # Listed too, so a deleted shard is regenerated (and gathered again).
        all_shards,
