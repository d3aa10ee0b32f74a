# Config checks, GPU resources, paths and input functions shared by the rules.
# Plan time only: nothing here imports torch.
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(workflow.main_snakefile).parent))

from workflow_scripts.workflow_config import (
    ConfigError,
    DEMO,
    check_gpus,
    check_paths,
    check_unknown_keys,
    dataset_path,
    demo_dir,
    meaning_settings_json,
    shard_names,
    teacher_path,
)


def load_schema(path):
    with open(Path(workflow.main_snakefile).parent / path) as handle:
        return yaml.safe_load(handle)


def check_config(config):
    """Everything that can be checked without torch, before any job runs."""
    global GPU_GROUPS
    GPU_GROUPS = check_gpus(config)
    check_paths(config)
    if GPU_GROUPS and config["gpu_assignment"] == "local":
        # Cap concurrent generate jobs at the number of groups without a --resources flag.
        workflow.global_resources.setdefault("gpu", len(GPU_GROUPS) * config["gpus_per_model"])
    if config["force_regenerate"]:
        workflow.dag_settings.forcerun = frozenset(workflow.dag_settings.forcerun) | {"generate"}


def out(*parts):
    return str(Path(config["output_dir"]).joinpath(*parts))


def gpus_per_job():
    """The `gpu` resource of one generate job: none in CPU mode."""
    return int(config["gpus_per_model"]) if check_gpus(config) else 0


def teacher_input(wildcards):
    return str(teacher_path(config))


def dataset_input(wildcards):
    return str(dataset_path(config))


def shard_path(shard):
    return out("shards", f"shard_{shard}.h5")


def all_shards(wildcards):
    return [shard_path(shard) for shard in shard_names(config)]
