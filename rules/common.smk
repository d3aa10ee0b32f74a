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
    shard_names,
    teacher_path,
)
from teacher_logits.errors import ConfigError, UserError
from teacher_logits.fingerprints import teacher_files
from teacher_logits.gpus import device_plan, resolve_gpu_assignment
from teacher_logits.layout import RunLayout
from teacher_logits.run_inputs import (
    InputSources,
    current_run_inputs,
    record_run_inputs,
)
from teacher_logits.run_lock import hold_run_lock
from teacher_logits.shard_records import flag_damaged_shards


def exit_with_config_error(error):
    # One line where the user looks, not a traceback.
    print(f"Config error: {error}", file=sys.stderr)
    raise SystemExit(1)


def checked_configfile(path):
    """The workflow's config file, parsed here first: Snakemake's parse error names no line.
    (A --configfile is parsed by Snakemake's command line before this file runs.)"""
    if not Path(path).exists():  # run from elsewhere with --snakefile: the workflow's own
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
        config["demo"]["dir"] = os.path.relpath(Path(WORKFLOW_DIR) / config["demo"]["dir"])
    # Resolved first: the GPU checks differ, and every job script sees local or scheduler.
    config["gpu_assignment"] = resolve_gpu_assignment(
        config["gpu_assignment"], under_cluster_executor()
    )
    try:
        devices = device_plan(config, under_cluster_executor())
        check_library_source(WORKFLOW_DIR)
        check_paths(config)
        check_chat_and_overflow(config)
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


def check_inputs_by_content(config, layout):
    """Compare the run's inputs and finished shards with what made them, by content.

    A change rewrites run_inputs.json (prepare's input), so Snakemake prepares again
    and each shard's job checks its own fingerprints and tokens against the new plan;
    a finished shard whose file changed since its job wrote it is dated back so its
    job runs again. Works from any working directory, path spelling or .snakemake.
    Jobs on a cluster re-read this file: only the head checks.
    """
    if workflow.remote_exec or not workflow.is_main_process:
        return
    try:
        inputs = current_run_inputs(InputSources.from_config(config), layout)
        changes = record_run_inputs(layout, inputs) if inputs is not None else []
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1)
    for change in changes:
            print(
                f"Note: since the last run, {change}: preparing again", file=sys.stderr
            )
    for line in flag_damaged_shards(layout, int(config["num_shards"])):
        print(f"Note: {line}", file=sys.stderr)


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
    """The teacher's files (config, weights, tokenizer, code), not its folder, whose
    timestamp stays put when a file in it is replaced; the demo's folder is a rule's output.
    """
    path = teacher_path(config)
    if config["teacher"]["path"] == "demo" or not path.is_dir():
        return str(path)
    return [str(p) for p in teacher_files(path)]


def run_inputs_input(wildcards):
    # Absent until the run's inputs exist (the demo's are built by the run); prepare writes it.
    return [str(LAYOUT.run_inputs)] if LAYOUT.run_inputs.exists() else []


def dataset_input(wildcards):
    return str(dataset_path(config))


def all_shards(wildcards):
    return expand(rules.generate.output.shard, shard=shard_names(config))
