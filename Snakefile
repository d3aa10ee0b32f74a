from snakemake.utils import min_version, validate


min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


check_unknown_keys(config, load_schema("config/schema.yaml"))
validate(config, "config/schema.yaml")
check_config(config)


include: "rules/demo.smk"
include: "rules/prepare.smk"
include: "rules/generate.smk"
include: "rules/gather.smk"


rule all:
    input:
        rules.gather.output,
    default_target: True
