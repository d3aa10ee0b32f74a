"""profiles/slurm and gpu_assignment, checked without a cluster (dry runs and plain Python).

The real cluster run is in test_slurm.py (`pytest -m slurm`).
"""

import re

import pytest
import yaml

from teacher_logits.gpus import resolve_gpu_assignment

from conftest import REPO

SLURM_PROFILE = ("--workflow-profile", "profiles/slurm")


def load_profile(name: str) -> dict:
    return yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())


def job_blocks(output: str) -> dict:
    """{rule: [resources line of each planned job]} from a dry run's job listing."""
    blocks = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(local)?rule (\w+):", block)
        if match:
            resources = re.search(r"^\s+resources: (.*)$", block, re.M)
            blocks.setdefault(match.group(2), []).append(
                (bool(match.group(1)), resources.group(1) if resources else "")
            )
    return blocks


def resources_of(line: str) -> dict:
    return dict(item.split("=", 1) for item in line.split(", "))


def test_slurm_profile_repeats_the_default_profile():
    # A named workflow profile replaces profiles/default: resume behaviour must not change.
    default, slurm = load_profile("default"), load_profile("slurm")
    for key, value in default.items():
        assert slurm.get(key) == value, f"profiles/slurm lacks {key}: {value} of profiles/default"


def test_slurm_profile_settings():
    profile = load_profile("slurm")
    assert profile["executor"] == "slurm"
    assert profile["jobs"] >= 1 and profile["latency-wait"] >= 30 and profile["retries"] >= 1
    assert profile["config"] == {"gpu_assignment": "scheduler"}
    # Account and partition are the user's: not in the profile, and default-resources
    # is left to them (a command-line --default-resources would replace it whole).
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    body = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "account" not in body and "partition" not in body
    assert "default-resources" not in profile
    for rule in ("prepare", "generate", "gather", "demo_corpus", "demo_teacher"):
        resources = profile["set-resources"][rule]
        assert resources["runtime"] > 0 and resources["mem_mb"] > 0, rule
        # The plugin refuses --gres/--gpus in slurm_extra; GPUs come from `gpu`.
        assert "gpu" not in resources and "slurm_extra" not in resources, rule


def test_every_key_of_the_slurm_profile_is_explained():
    lines = (REPO / "profiles" / "slurm" / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z-]+:", line):
            # A comment directly above, or above a run of keys it explains together.
            above = i - 1
            while above >= 0 and re.match(r"^[a-z-]+:", lines[above]):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f"no comment above {line!r}"


@pytest.mark.parametrize(
    "value,cluster,expected",
    [
        ("auto", False, "local"),
        ("auto", True, "scheduler"),
        ("local", True, "local"),
        ("scheduler", False, "scheduler"),
    ],
)
def test_resolve_gpu_assignment(value, cluster, expected):
    assert resolve_gpu_assignment(value, cluster) == expected


def test_slurm_dry_run_asks_for_gpus_per_model_on_generate_only(workflow):
    # The README's command shape: --config replaces the profile's config block, and
    # gpu_assignment=auto still resolves to scheduler under the slurm executor.
    result = workflow.run("-n", *SLURM_PROFILE, "--config", "gpus_per_model=2", "num_shards=3")
    blocks = job_blocks(result.stdout)
    assert len(blocks["generate"]) == 3
    for local, line in blocks["generate"]:
        resources = resources_of(line)
        assert not local and resources["gpu"] == "2"
        assert resources["cpus_per_task"] == "4"  # generation.threads
        assert resources["runtime"] == "240" and resources["mem_mb"] == "64000"
    for rule in ("prepare", "gather"):  # the demo teacher is already built here
        ((local, line),) = blocks[rule]
        assert not local and "gpu" not in resources_of(line), rule


def test_slurm_profile_ignores_local_gpu_ids_with_a_note(workflow):
    result = workflow.run("-n", *SLURM_PROFILE, "--config", "gpus=0,1,2,3", "gpus_per_model=1")
    assert "gpus=0,1,2,3 is not used with gpu_assignment=scheduler" in result.stderr
    for _, line in job_blocks(result.stdout)["generate"]:
        assert resources_of(line)["gpu"] == "1"


def test_local_run_keeps_local_assignment(workflow):
    # No cluster executor: auto is local, CPU mode asks for no GPU at all.
    blocks = job_blocks(workflow.run("-n", "--cores", "2").stdout)
    for _, line in blocks["generate"]:
        assert resources_of(line).get("gpu", "0") == "0"
    blocks = job_blocks(workflow.run("-n", "--config", "gpus=0,1", "gpus_per_model=2").stdout)
    for _, line in blocks["generate"]:
        assert resources_of(line)["gpu"] == "2"


@pytest.mark.parametrize("gpus", ["", "0,1,2,3"])
def test_scheduler_assignment_keeps_what_slurm_set_whatever_gpus_says(tmp_path, monkeypatch, gpus):
    import teacher_logits.gpus as devices

    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
    environ = {"CUDA_VISIBLE_DEVICES": "2,3"}

    def plan(per_model, assignment):
        config = {"gpus": gpus, "gpus_per_model": per_model, "gpu_assignment": assignment}
        return devices.device_plan(config, environ={})

    with devices.gpu_claim(plan(2, "scheduler"), environ=environ) as claim:
        assert environ == {"CUDA_VISIBLE_DEVICES": "2,3"}
        assert claim.cuda_visible_devices == "2,3" and claim.group_index is None
    assert not (tmp_path / "locks").exists()
    # A mask of UUIDs or MIG ids passes through as it is.
    mig = "MIG-4f1c2a3e-1b2c-4d5e-8f90-123456789abc"
    environ = {"CUDA_VISIBLE_DEVICES": mig}
    with devices.gpu_claim(plan(1, "scheduler"), environ=environ) as claim:
        assert claim.cuda_visible_devices == mig == environ["CUDA_VISIBLE_DEVICES"]
    # auto is the scheduler's under a cluster executor, else local (cpu without gpus).
    config = {"gpus": gpus, "gpus_per_model": 1, "gpu_assignment": "auto"}
    assert devices.device_plan(config, under_cluster_executor=True, environ={}).mode == "scheduler"
    local = devices.device_plan(config, environ={})
    assert local.mode == ("local" if gpus else "cpu")
    with pytest.raises(devices.GpuConfigError, match="'auto', 'local' or 'scheduler'"):
        devices.device_plan({**config, "gpu_assignment": "slurm"}, environ={})


@pytest.mark.slow
def test_scheduler_job_without_a_gpu_fails_in_one_line(workflow):
    # As a cluster job on a CPU-only partition would: the scheduler set no usable GPU.
    result = workflow.run(
        "--cores",
        "1",
        "--config",
        "gpu_assignment=scheduler",
        "num_shards=1",
        config={"dataset": {"max_samples": 20}},
        check=False,
        env={"CUDA_VISIBLE_DEVICES": "0,1"},
    )
    assert result.returncode != 0
    message = (
        "the scheduler gave this job CUDA_VISIBLE_DEVICES='0,1' but CUDA sees no GPU; "
        "run generate on a GPU partition"
    )
    assert message in result.stderr
    assert "Traceback" not in result.stderr
