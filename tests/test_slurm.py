"""The workflow through `snakemake --executor slurm` on a real single-node SLURM cluster.

Selected with `pytest -m slurm` (`make test-slurm`, run by `.ci/run`). The cluster
(`slurm_cluster.py`) has four fake GPUs, so SLURM really assigns GPUs and sets
`CUDA_VISIBLE_DEVICES` per job; the teacher then runs on CPU (`allow_cpu`).
"""

import os
import re
import subprocess
import time

import h5py
import numpy as np
import pytest
import yaml

from teacher_logits import LogitStore
from teacher_logits.store.format import read_attrs

from conftest import demo_workflow, snakemake_bin
from slurm_cluster import SlurmCluster, missing_requirements

# Checked at import, so a machine without SLURM skips before the demo teacher is built.
# CI must run these tests: there a missing requirement fails them instead.
MISSING = missing_requirements()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"), reason=str(MISSING)),
]

# What a user of a cluster without accounting adds to the README's command; the
# last flag only makes the test poll SLURM sooner than the plugin's 40 s default.
SLURM_FLAGS = (
    "--workflow-profile",
    "profiles/slurm",
    "--slurm-status-command",
    "squeue",
    "--slurm-no-account",
    "--slurm-init-seconds-before-status-checks",
    "1",
)
# Nested keys go through a config file; gpus_per_model on the command line, as the
# README shows (a --config replaces the profile's config block: auto must still work).
# Windows of 32 x 512 tokens, each committed: a shard is a few parts, so a cancel
# lands mid-shard.
CONFIG = {
    "num_shards": 4,
    "allow_cpu": True,
    "generation": {"threads": 1, "batch_tokens": 512, "commit_every_s": 0},
}
COMMAND_LINE = ("--config", "gpus_per_model=2")
DATASETS = ("sample_ids", "offsets", "input_ids", "topk_ids", "topk_logits", "logsumexp", "entropy")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if MISSING:
        pytest.fail(f"{MISSING}; CI must run the SLURM tests, not skip them")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        daemons = list(cluster.procs.values())
        cluster.stop()
        assert all(p.poll() is not None for p in daemons), "a SLURM daemon outlived the tests"


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, demo_dir):
    """The same config run by a plain local `snakemake`: what SLURM must reproduce."""
    root = tmp_path_factory.mktemp("local")
    wf = demo_workflow(root, demo_dir)
    wf.run("--cores", "2", config=CONFIG)
    return store_contents(wf)


def slurm_env(cluster) -> dict:
    # The jobs run `python -m snakemake` with the head's interpreter; PATH only has
    # to find SLURM's commands (and the cluster's srun, see slurm_cluster.py).
    return {
        **cluster.env,
        "PATH": os.pathsep.join(
            [os.path.dirname(os.path.abspath(snakemake_bin())), cluster.env["PATH"]]
        ),
    }


def job_counts(output: str) -> dict:
    """Snakemake's 'Job stats' table as {rule: count}."""
    table = output.split("Job stats:")[-1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def store_contents(wf) -> dict:
    """Every stored number: the shards' datasets and the reader's view of the store."""
    contents = {}
    for path in sorted(wf.path("results/demo", "shards").glob("shard_*.h5")):
        with h5py.File(path) as f:
            contents[path.name] = {name: f[name][...] for name in DATASETS}
    store = LogitStore(wf.path("results/demo"))
    contents["reader"] = [store[i] for i in range(len(store))]
    return contents


def assert_same_store(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for shard in want:
        if shard == "reader":
            continue
        for name in DATASETS:
            np.testing.assert_array_equal(
                got[shard][name], want[shard][name], err_msg=f"{shard}:{name}"
            )
    assert len(got["reader"]) == len(want["reader"])
    for a, b in zip(got["reader"], want["reader"]):
        assert a.keys() == b.keys()
        for key in a:
            if key == "logsumexp_t":  # {temperature: rows}
                assert a[key].keys() == b[key].keys()
                for t in a[key]:
                    np.testing.assert_array_equal(a[key][t], b[key][t], err_msg=f"T={t}")
                continue
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"sample {b['sample_id']}:{key}")


def shard_claims(wf) -> dict:
    """{shard file: every claim that worked on it}, the one that finished it last."""
    claims = {}
    for path in sorted(wf.path("results/demo", "shards").glob("shard_*.h5")):
        with h5py.File(path) as f:
            attrs = read_attrs(f)
        assert attrs["claims"][-1]["cuda_visible_devices"] == attrs["cuda_visible_devices"]
        claims[path.name] = attrs["claims"]
    return claims


def slurm_jobs(cluster, after: int = 0) -> list[tuple[str, str]]:
    """(job id, the plugin's comment naming rule and wildcards) of each job after ``after``."""
    out = cluster.client("squeue", "-h", "-t", "all", "-o", "%i|%k").stdout
    jobs = [tuple(line.split("|")) for line in out.splitlines() if line.strip()]
    return [job for job in jobs if int(job[0]) > after]


def last_job_id(cluster) -> int:
    return max((int(job[0]) for job in slurm_jobs(cluster)), default=0)


def test_slurm_run_matches_local_run(cluster, workflow, local_store):
    before = last_job_id(cluster)
    result = workflow.run(
        *SLURM_FLAGS, *COMMAND_LINE, config=CONFIG, env=slurm_env(cluster), timeout=1500
    )
    log = result.stdout + result.stderr
    counts = job_counts(log)
    assert [
        counts.get(rule) for rule in ("regenerate_request", "prepare", "generate", "gather")
    ] == [1, 1, 4, 1]
    assert "localrule regenerate_request" in log  # no SLURM job for writing a token

    # Every shard ran in its own SLURM job with the GPUs SLURM gave it, untouched.
    assigned = cluster.gpu_assignments()
    claims = {name: only for name, (only,) in shard_claims(workflow).items()}
    assert len(claims) == 4
    for name, claim in claims.items():
        job = claim["scheduler_job_id"]
        assert job in assigned, f"{name}: SLURM job {job} unknown to the cluster"
        assert claim["cuda_visible_devices"] == assigned[job], name
        assert len(claim["cuda_visible_devices"].split(",")) == 2
    # Two shards ran at once (SLURM started the first two side by side on the four
    # GPUs), and jobs running at the same time never shared a GPU.
    assert {c["cuda_visible_devices"] for c in claims.values()} == {"0,1", "2,3"}
    items = list(claims.values())
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            if a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]:
                assert not set(a["cuda_visible_devices"].split(",")) & set(
                    b["cuda_visible_devices"].split(",")
                ), "two running shards shared a GPU"

    # SLURM allocated gpus_per_model GPUs to each generate job, none to prepare and gather.
    by_rule = {}
    for job_id, comment in slurm_jobs(cluster, after=before):
        by_rule.setdefault(comment.split("_wildcards")[0], []).append(assigned.get(job_id, ""))
    assert sorted(by_rule) == ["rule_gather", "rule_generate", "rule_prepare"]
    assert [len(gpus.split(",")) for gpus in by_rule["rule_generate"]] == [2] * 4
    assert by_rule["rule_prepare"] == by_rule["rule_gather"] == [""]

    assert_same_store(store_contents(workflow), local_store)
    again = workflow.run(*SLURM_FLAGS, *COMMAND_LINE, config=CONFIG, env=slurm_env(cluster))
    assert "Nothing to be done" in again.stdout + again.stderr


def test_scancel_mid_shard_then_rerun_resumes(cluster, workflow, local_store):
    config_file = workflow.path("test_config.yaml")
    config_file.write_text(yaml.safe_dump(CONFIG))
    # --retries 0: the cancelled shard fails this run instead of being resubmitted,
    # so the rerun below has to pick it up.
    command = [
        snakemake_bin(),
        *SLURM_FLAGS,
        "--retries",
        "0",
        "--configfile",
        str(config_file),
        *COMMAND_LINE,
    ]
    env = {
        **os.environ,
        "TEACHER_LOGITS_GPU_LOCK_DIR": str(workflow.lock_dir),
        **slurm_env(cluster),
    }
    shards = workflow.path("results/demo", "shards")
    with open(workflow.path("head.log"), "w") as head_log:
        head = subprocess.Popen(
            command, cwd=workflow.root, env=env, stdout=head_log, stderr=subprocess.STDOUT
        )
        try:
            # A shard with a committed part and no shard file yet is mid-shard.
            deadline = time.monotonic() + 900
            victim = None
            while victim is None and head.poll() is None and time.monotonic() < deadline:
                victim = next(
                    (
                        p.name.replace(".parts", ".h5")
                        for p in sorted(shards.glob("shard_*.parts"))
                        if list(p.glob("part_*.h5"))
                        and not (shards / p.name.replace(".parts", ".h5")).exists()
                    ),
                    None,
                )
                time.sleep(0.05)
            assert victim is not None, workflow.path("head.log").read_text()[-4000:]
            job = job_of_shard(workflow, victim)
            cluster.client("scancel", job)
            head.wait(timeout=900)
        finally:
            if head.poll() is None:
                head.kill()
                head.wait()
    head_output = workflow.path("head.log").read_text()
    assert head.returncode != 0, head_output[-4000:]
    assert not (shards / victim).exists(), f"{victim} finished before it could be cancelled"
    # keep-going (profiles/slurm): every other shard finished and is kept.
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.h5")}
    assert len(done) == 3 and victim not in done

    # The same command again: only the cancelled shard and gather run.
    rerun = subprocess.run(
        command, cwd=workflow.root, env=env, capture_output=True, text=True, timeout=1500
    )
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-6000:]
    counts = job_counts(log)
    assert counts.get("generate") == 1 and counts.get("gather") == 1 and not counts.get("prepare")
    for name, mtime in done.items():
        assert (shards / name).stat().st_mtime_ns == mtime, f"{name} was regenerated"
    assert not list(shards.glob("*.partial"))
    # Mid-shard resume: the cancelled job's committed rows were kept, and every claim
    # that computed rows ran on the GPUs SLURM gave its job.
    claims = shard_claims(workflow)[victim]
    assert claims[0]["scheduler_job_id"] == job and claims[0]["rows"] > 0
    for claim in claims:
        assert claim["cuda_visible_devices"] == cluster.gpu_assignments()[claim["scheduler_job_id"]]
    index = victim.removeprefix("shard_").removesuffix(".h5")
    resumed_log = workflow.path(
        "results/demo", "logs", "generate", f"shard_{index}.log"
    ).read_text()
    assert "resuming" in resumed_log, resumed_log
    assert_same_store(store_contents(workflow), local_store)


def job_of_shard(wf, shard_file: str) -> str:
    """The SLURM job id the shard's own log names (generate logs it before loading)."""
    index = shard_file.removeprefix("shard_").removesuffix(".h5")
    text = wf.path("results/demo", "logs", "generate", f"shard_{index}.log").read_text()
    marker = "(set by the scheduler, job "
    assert marker in text, text
    return text.split(marker, 1)[1].split(")", 1)[0]
