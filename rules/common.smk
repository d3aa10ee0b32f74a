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
    dataset_paths,
    demo_corpus_path,
    demo_teacher_path,
    meaning_settings_json,
    teacher_path,
)
from teacher_logits.errors import ConfigError, UserError
from teacher_logits.generation.parts import remove_parts_dirs
from teacher_logits.gpus import device_plan, resolve_gpu_assignment
from teacher_logits.layout import RunLayout
from teacher_logits.run_inputs import (
    DataSources,
    InputSources,
    current_run_inputs,
    dataset_inputs,
    load_digest_cache,
    save_digest_cache,
)
from teacher_logits.run_lock import hold_run_lock
from teacher_logits.sampling import check_sampling
from teacher_logits.shard_plan import plan_shards
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
        check_sampling(config)
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


def plan_the_shards(config, layout):
    """The run's shards: the segments prepare recorded, plus one for rows appended since
    (``shard_plan``); and rerun the jobs whose inputs changed by content since they ran.

    Snakemake reruns by timestamps and by its records in .snakemake, keyed by paths as
    typed: a setting changed under another spelling of output_dir, files replaced with
    their timestamps kept, or a fresh .snakemake go unseen. So the current inputs are
    fingerprinted here and compared with those each segment was planned from; a
    difference dates that segment's plan.json back, so prepare runs again (each shard's
    job then keeps its shard if it still holds), and a finished shard whose size is not
    what its job wrote is dated forward. Only timestamps change, and a plan dated back
    by a dry run with other settings gets its date back once the settings are back.
    Cluster jobs, which read this file again, only need the segments.
    """
    head = not workflow.remote_exec and workflow.is_main_process
    cache = load_digest_cache(layout)
    before = dict(cache)
    try:
        sources = InputSources.from_config(config)
        if head:
            inputs = current_run_inputs(sources, layout, cache)
        else:
            inputs = dataset_inputs(sources, cache)
        plan = plan_shards(layout, DataSources.from_config(config), inputs, cache, head)
    except UserError as error:
        exit_with_config_error(error)
    if not head:
        return plan
    save_digest_cache(layout, cache, before)
    for note in plan.notes:
        print(f"Note: {note}", file=sys.stderr)
    dated = date_back(layout, plan.outdated, plan.num_shards, len(plan.segments))
    for line in dated:
        print(f"Note: {line}", file=sys.stderr)
    return plan


def discard_kept_work_of_forced_shards(config):
    """--forcerun, --forceall and -f on shards regenerate them from zero: drop their
    committed parts and kept copies (the jobs cannot tell they were forced)."""
    settings = workflow.dag_settings
    asked = set(settings.forcerun)
    if settings.forcetargets:
        asked |= set(settings.targets)
    every = settings.forceall or "generate" in asked
    asked_files = {os.path.abspath(item) for item in asked}
    shards = [LAYOUT.shard(i) for i in range(SHARD_PLAN.num_shards)]
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
    segment = SHARD_PLAN.by_wildcard(wildcards.segment)
    return [str(p) for p in SHARD_PLAN.dataset_files(segment, dataset_paths(config))]


def all_shards(wildcards):
    return expand(rules.generate.output.shard, shard=SHARD_PLAN.shard_names())


def segment_files(pattern):
    """Input function: one file of every segment (``pattern`` holds ``{segment}``)."""
    return lambda wildcards: expand(str(pattern), segment=SHARD_PLAN.wildcards())


def own_segment(wildcards):
    """A shard's own segment's prepared files, not every segment's: appending rows (a new
    segment) reruns no old shard's job."""
    index = SHARD_PLAN.segment_of(int(wildcards.shard)).index
    return {
        "tokens": str(LAYOUT.segment_tokens(index)),
        "plan": str(LAYOUT.segment_plan(index)),
    }


def prepare_settings(wildcards):
    return meaning_settings_json(
        config, SHARD_PLAN.by_wildcard(wildcards.segment).max_samples
    )


def segment_shard_count(wildcards):
    return SHARD_PLAN.by_wildcard(wildcards.segment).num_shards


def segment_rows(wildcards):
    # A Segment object: Snakemake records only params it can represent (builtins), so its
    # rows reach the job without ever being compared, and an end row learned after a
    # first plan (or a recorded one) reruns nothing. What identifies a segment's content
    # (its first row and shards) never changes once planned.
    return SHARD_PLAN.by_wildcard(wildcards.segment)
