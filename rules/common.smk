# Config checks, the device plan, paths and input functions shared by the rules.
# Plan time only: nothing here imports torch.
import os
import sys
import uuid
from pathlib import Path

import yaml

# The library sits beside this workflow. Job scripts find it through the link
# workflow_scripts/teacher_logits (Snakemake puts a script's folder on its sys.path),
# or an installed copy (`pip install -e .`).
WORKFLOW_DIR = str(Path(workflow.main_snakefile).parent)
sys.path.insert(0, WORKFLOW_DIR)

from teacher_logits.config import (
    check_chat_and_overflow,
    check_config_file,
    check_library_source,
    check_paths,
    check_schema,
    check_unknown_keys,
    coerce_command_line_values,
    dataset_path,
    demo_corpus_path,
    demo_teacher_path,
    meaning_settings_json,
    shard_names,
    teacher_path,
)
from teacher_logits.errors import ConfigError, UserError
from teacher_logits.generation.parts import remove_parts_dirs
from teacher_logits.gpus import device_plan, resolve_gpu_assignment
from teacher_logits.layout import RunLayout
from teacher_logits.run_inputs import (
    InputSources,
    changes_since_plan,
    current_run_inputs,
)
from teacher_logits.run_lock import hold_run_lock
from teacher_logits.shard_records import date_back
from teacher_logits.temperatures import check_temperatures


def exit_with_config_error(error):
    # One line where the user looks, not a traceback.
    print(f"Config error: {error}", file=sys.stderr)
    raise SystemExit(1)


def checked_configfile(path):
    """The workflow's config file, parsed here first: Snakemake's parse error names no line.
    (A --configfile is parsed by Snakemake's command line before this file runs.)"""
    if not Path(
        path
    ).exists():  # run from elsewhere with --snakefile: the workflow's own
        path = str(Path(WORKFLOW_DIR) / path)
    try:
        return check_config_file(path)
    except ConfigError as error:
        exit_with_config_error(error)


def check_config_values(config, schema_path):
    """Unknown keys and schema violations as one line each, before Snakemake's validate."""
    with open(Path(WORKFLOW_DIR) / schema_path) as handle:
        schema = yaml.safe_load(handle)
    coerce_command_line_values(config, schema)
    try:
        check_unknown_keys(config, schema)
        check_schema(config, schema)
    except ConfigError as error:
        exit_with_config_error(error)


def under_cluster_executor():
    """True in the head of a cluster run (--executor slurm) and in the jobs it submits.

    The executor itself is not known while the Snakefile is parsed, but a cluster
    head needs --jobs, which Snakemake keeps as `nodes` (a local run turns --jobs
    into cores), and the jobs it submits run Snakemake in remote mode.
    """
    return workflow.remote_exec or workflow.resource_settings.nodes is not None


def check_config(config):
    """Everything that can be checked without torch, before any job runs; the device plan.

    Jobs read the same plan from the config (never from params: a params trigger
    would rerun every shard when the GPU list changes).
    """
    # The demo is built beside the workflow, whatever the working directory.
    # (Relative to the working directory, so a copied run's paths stay the same.)
    if not Path(config["demo"]["dir"]).is_absolute():
        config["demo"]["dir"] = os.path.relpath(
            Path(WORKFLOW_DIR) / config["demo"]["dir"]
        )
    # Resolved first: the GPU checks differ, and every job script sees local or scheduler.
    config["gpu_assignment"] = resolve_gpu_assignment(
        config["gpu_assignment"], under_cluster_executor()
    )
    try:
        devices = device_plan(config, under_cluster_executor())
        check_library_source(WORKFLOW_DIR)
        check_paths(config)
        check_chat_and_overflow(config)
        check_temperatures(config)
    except ConfigError as error:
        exit_with_config_error(error)
    if devices.mode == "scheduler" and devices.groups and workflow.is_main_process:
        print(
            f"Note: gpus={config['gpus']} is not used with gpu_assignment=scheduler: the "
            f"scheduler gives each generate job gpus_per_model={config['gpus_per_model']} "
            "GPUs of its choosing",
            file=sys.stderr,
        )
    if devices.local_gpus:
        # Cap concurrent generate jobs at the number of groups without a --resources flag.
        workflow.global_resources.setdefault("gpu", devices.local_gpus)
    return devices


def force_what_changed(config, layout):
    """Rerun the jobs whose inputs changed by content since they ran.

    Snakemake reruns by timestamps and by its records in .snakemake, keyed by paths as
    typed: a setting changed under another spelling of output_dir, files replaced with
    their timestamps kept, or a fresh .snakemake go unseen. So the current inputs are
    fingerprinted here and compared with those the plan was made from; a difference
    dates plan.json back, so prepare runs again (each shard's job then keeps its shard
    if it still holds), and a finished shard whose size is not what its job wrote is
    dated back too. Only timestamps change, and a plan dated back by a dry run with
    other settings gets its date back once the settings are back. Cluster jobs, which
    read this file again, skip it.
    """
    if workflow.remote_exec or not workflow.is_main_process:
        return
    try:
        inputs = current_run_inputs(InputSources.from_config(config), layout)
    except UserError as error:
        exit_with_config_error(error)
    if inputs is None:  # the demo's teacher or data are still to be built: prepare runs
        return
    changes = changes_since_plan(layout, inputs)
    for change in changes:
        print(
            f"Note: since prepare last ran, {change}: preparing again", file=sys.stderr
        )
    for line in date_back(layout, bool(changes), int(config["num_shards"])):
        print(f"Note: {line}", file=sys.stderr)


def discard_kept_work_of_forced_shards(config):
    """--forcerun, --forceall and -f on shards regenerate them from zero: drop their
    committed parts and kept copies (the jobs cannot tell they were forced)."""
    settings = workflow.dag_settings
    asked = set(settings.forcerun)
    if settings.forcetargets:
        asked |= set(settings.targets)
    every = settings.forceall or "generate" in asked
    asked_files = {os.path.abspath(item) for item in asked}
    shards = [LAYOUT.shard(i) for i in range(int(config["num_shards"]))]
    remove_parts_dirs(
        [s for s in shards if every or os.path.abspath(s) in asked_files],
        keep_finished=False,
    )


def take_run_lock(config):
    """Refuse a second run on the same output_dir (runs only when jobs will execute)."""
    try:
        hold_run_lock(config["output_dir"])
    except ConfigError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1)


def regenerate_token():
    """A new token forces every shard to be regenerated (force_regenerate=true).

    Otherwise the token on disk is kept, so the run after a forced one reruns nothing.
    """
    token_file = LAYOUT.regenerate_token
    if config["force_regenerate"]:
        return uuid.uuid4().hex
    return token_file.read_text().strip() if token_file.exists() else "initial"


def teacher_input(wildcards):
    return str(teacher_path(config))


def dataset_input(wildcards):
    return str(dataset_path(config))


def all_shards(wildcards):
    return expand(rules.generate.output.shard, shard=shard_names(config))
