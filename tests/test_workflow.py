"""End-to-end: the real snakemake CLI on a copy of the workflow in a temporary folder."""

import json
import os
import re

import h5py
import numpy as np
import pytest

from teacher_logits import LogitStore
from teacher_logits.store.format import read_attrs

from conftest import small_teacher

GPU_RUN = {
    "gpus": "0,1,2,3",
    "gpus_per_model": 2,
    "allow_cpu": True,
    "num_shards": 6,
    "generation": {"threads": 1, "batch_tokens": 2048},
    "dataset": {"max_samples": 300},
}


def shard_files(wf, output_dir="results/demo"):
    return sorted(wf.path(output_dir, "shards").glob("shard_*.h5"))


def job_counts(output: str) -> dict:
    """Snakemake's 'Job stats' table as {rule: count}."""
    table = output.split("Job stats:")[-1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_plans_every_shard_without_torch(workflow, tmp_path):
    # A fake torch that explodes on import proves plan time never imports it.
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text(
        "raise ImportError('torch imported at plan time')\n"
    )
    result = workflow.run(
        "-n",
        "--config",
        "num_shards=5",
        "gpus=0,1,2,3",
        "gpus_per_model=2",
        env={"PYTHONPATH": str(poison)},
    )
    counts = job_counts(result.stdout + result.stderr)
    assert counts["generate"] == 5
    assert counts["prepare"] == 1 and counts["gather"] == 1
    assert "torch imported at plan time" not in result.stderr


@pytest.mark.slow
def test_gpu_groups_end_to_end_rerun_and_repair(workflow):
    workflow.run("--cores", "4", config=GPU_RUN)
    shards = shard_files(workflow)
    assert len(shards) == 6

    claims, jobs = [], []
    for path in shards:
        with h5py.File(path) as f:
            attrs = read_attrs(f)
        assert attrs["cuda_visible_devices"] in ("0,1", "2,3")
        (claim,) = attrs["claims"]
        assert claim["cuda_visible_devices"] == attrs["cuda_visible_devices"]
        assert claim["started_at"] <= claim["finished_at"]
        claims.append((attrs["cuda_visible_devices"], claim["started_at"], claim["finished_at"]))
        jobs.append((attrs["job_started_at"], attrs["finished_at"]))
    # Both groups used, and no two overlapping jobs held the same group.
    assert {c[0] for c in claims} == {"0,1", "2,3"}
    for i, (group_a, start_a, end_a) in enumerate(claims):
        for group_b, start_b, end_b in claims[i + 1 :]:
            if start_a < end_b and start_b < end_a:
                assert group_a != group_b, "two running jobs shared a GPU group"
    # The workflow's own gpu cap (4 GPUs / 2 per model) holds with --cores 4 and no
    # --resources: never more than two generate processes alive, waiting or not.
    for start, _ in jobs:
        assert sum(1 for s, e in jobs if s <= start < e) <= 2

    manifest = workflow.manifest()
    assert [s["index"] for s in manifest["shards"]] == list(range(6))
    assert sum(s["num_tokens"] for s in manifest["shards"]) == manifest["num_tokens"]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert 0 < manifest["stats"]["mean_topk_mass"] <= 1

    # A second run does nothing.
    again = workflow.run("--cores", "4", config=GPU_RUN)
    assert "Nothing to be done" in again.stdout + again.stderr

    # Losing one shard regenerates only that shard, then gather.
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[3].unlink()
    repair = workflow.run("--cores", "4", config=GPU_RUN)
    counts = job_counts(repair.stdout + repair.stderr)
    assert counts.get("generate") == 1 and counts.get("gather") == 1 and "prepare" not in counts
    for path in shard_files(workflow):
        if path.name != shards[3].name:
            assert path.stat().st_mtime_ns == mtimes[path.name]

    # Changing only the batch size or GPU list keeps every finished shard.
    changed = {**GPU_RUN, "gpus": "0,1", "generation": {"threads": 1, "batch_tokens": 999}}
    dry = workflow.run("-n", "--cores", "2", config=changed)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def _datasets(path):
    with h5py.File(path) as f:
        return {name: f[name][...] for name in f}


@pytest.mark.slow
def test_force_regenerate_redoes_every_shard(workflow):
    config = {"num_shards": 2, "dataset": {"max_samples": 40}}
    workflow.run("--cores", "2", config=config)
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(workflow)}
    first = {p.name: _datasets(p) for p in shard_files(workflow)}
    result = workflow.run("--cores", "2", "--config", "force_regenerate=true", config=config)
    assert job_counts(result.stdout + result.stderr).get("generate") == 2
    after = {p.name: p.stat().st_mtime_ns for p in shard_files(workflow)}
    assert before.keys() == after.keys() and all(after[k] > before[k] for k in before)
    # Same config, same thread count: the regenerated shards are bit-identical.
    for path in shard_files(workflow):
        again = _datasets(path)
        for name, values in first[path.name].items():
            np.testing.assert_array_equal(again[name], values, err_msg=f"{path.name}:{name}")
    # The run after a forced one is a normal run again: nothing to do.
    calm = workflow.run("--cores", "2", config=config)
    assert "Nothing to be done" in calm.stdout + calm.stderr


@pytest.mark.slow
def test_demo_runs_with_no_config(workflow):
    workflow.run("--cores", "2")
    store = LogitStore(workflow.path("results/demo"))
    manifest = workflow.manifest()
    assert len(store) == manifest["num_samples"] > 0
    assert store.num_tokens == manifest["num_tokens"]
    assert store.top_k == 64
    assert len(manifest["shards"]) == 8
    # The trained demo teacher is peaked: the next token is usually among its top-64.
    assert manifest["stats"]["next_token_in_topk_fraction"] > 0.5


def test_stored_topk_matches_unbatched_float32_forward(workflow, demo_dir):
    import torch
    from transformers import AutoModelForCausalLM

    config = {
        "teacher": {"dtype": "float32"},
        "storage": {"value_dtype": "float32"},
        "num_shards": 2,
        "dataset": {"max_samples": 120},
        "generation": {
            "top_k": 16,
            "batch_tokens": 4096,
            "threads": 2,
            "temperatures": [0.5, 1.0, 2.0],
        },
    }
    workflow.run("--cores", "2", config=config)
    store = LogitStore(workflow.path("results/demo"))
    assert store.temperatures == [0.5, 1.0, 2.0]
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "teacher", dtype=torch.float32)
    model.eval()
    for i in (0, 7, 55, len(store) - 1):
        rec = store[i]
        with torch.no_grad():
            logits = model(torch.from_numpy(rec["input_ids"].astype(np.int64))[None]).logits[0]
        expected_lse = torch.logsumexp(logits, -1).numpy()
        values, ids = torch.topk(logits, 16, -1)
        np.testing.assert_allclose(rec["logsumexp"], expected_lse, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(rec["topk_logits"], values.numpy(), atol=1e-4, rtol=1e-5)
        # The same bound at each temperature: batched and unbatched float32 forwards differ
        # by a few ulps (~1e-6 relative), which 1/T = 2 at most doubles.
        assert list(rec["logsumexp_t"]) == [0.5, 1.0, 2.0]
        for temperature, lse in rec["logsumexp_t"].items():
            expected = torch.logsumexp(logits / temperature, -1).numpy()
            np.testing.assert_allclose(lse, expected, atol=1e-4, rtol=1e-5, err_msg=temperature)
        # Ids agree except where two logits tie within float noise.
        differs = rec["topk_ids"] != ids.numpy()
        gaps = np.abs(np.diff(values.numpy(), axis=1))
        near_tie = np.zeros_like(differs)
        near_tie[:, :-1] |= gaps < 1e-4
        near_tie[:, 1:] |= gaps < 1e-4
        assert not (differs & ~near_tie).any()
        probs = torch.softmax(logits, -1)
        entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1).numpy()
        np.testing.assert_allclose(rec["entropy"].astype(np.float32), entropy, rtol=2e-3, atol=2e-3)

    # The training side reads the same rows: the teacher's own logits, as a student,
    # have zero KD loss at every stored temperature (rows aligned, logsumexp_t right).
    # Bound: float32 storage, so the only error is the float32 rounding of the
    # log-probabilities (~1e-6 each), far below 1e-4 nats.
    from transformers import AutoTokenizer

    from teacher_logits.tokenizer_identity import tokenizer_content_fingerprint
    from teacher_logits.training import check_tokenizer, collate, kd_loss

    records = [store[i] for i in (0, 7, 55)]
    batch = collate(records)
    with torch.no_grad():
        teacher_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    for temperature in (0.5, 1.0, 2.0):
        for tail in ("bucket", "renormalize"):
            loss = kd_loss(teacher_logits, batch, temperature=temperature, tail=tail)
            assert abs(float(loss)) < 1e-4, (temperature, tail, float(loss))
    # Gather copied the tokenizer; the teacher's own passes the student check.
    assert store.vocab_size == model.config.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    check_tokenizer(store, tokenizer)
    assert store.tokenizer_content_fingerprint == tokenizer_content_fingerprint(tokenizer)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
@pytest.mark.slow
def test_other_architectures_match_their_own_forward(workflow, demo_dir, tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM

    teacher = small_teacher(arch, demo_dir, tmp_path / arch)
    workflow.run(
        "--cores",
        "2",
        config={
            "teacher": {"path": str(teacher), "dtype": "float32"},
            "storage": {"value_dtype": "float32"},
            "num_shards": 1,
            "dataset": {"max_samples": 40},
            "generation": {"top_k": 8, "batch_tokens": 2048},
        },
    )
    log = workflow.path("results/demo/logs/generate/shard_00000.log").read_text()
    assert ("chunked output head" in log) is (arch == "gpt2")
    store = LogitStore(workflow.path("results/demo"))
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for i in (0, 13, 39):
        rec = store[i]
        with torch.no_grad():
            logits = model(torch.from_numpy(rec["input_ids"].astype(np.int64))[None]).logits[0]
        np.testing.assert_allclose(
            rec["logsumexp"], torch.logsumexp(logits, -1).numpy(), atol=1e-4, rtol=1e-5
        )
        np.testing.assert_allclose(
            rec["topk_logits"], torch.topk(logits, 8, -1).values.numpy(), atol=1e-4, rtol=1e-5
        )


@pytest.mark.slow
def test_reader_random_access_and_dataloader(workflow):
    import torch

    workflow.run("--cores", "2", config={"num_shards": 3, "dataset": {"max_samples": 90}})
    store = LogitStore(workflow.path("results/demo", "index.h5"))
    assert len(store) == 90
    assert list(store.sample_ids) == sorted(store.sample_ids)
    rec = store.by_sample_id(int(store.sample_ids[40]))
    assert rec["sample_id"] == int(store.sample_ids[40])
    assert rec["topk_ids"].shape == (len(rec["input_ids"]), 64)
    assert rec["topk_logits"].dtype == np.float16
    with pytest.raises(KeyError):
        store.by_sample_id(10**9)

    loader = torch.utils.data.DataLoader(store, batch_size=None, shuffle=True, num_workers=2)
    seen = {int(r["sample_id"]) for r in loader}
    assert seen == set(int(s) for s in store.sample_ids)

    # Token-budget batches through the training collate, with workers.
    from teacher_logits.training import ShardLocalBatchSampler, collate

    sampler = ShardLocalBatchSampler(store, max_tokens=2048, seed=0)
    batched = torch.utils.data.DataLoader(
        store, batch_sampler=sampler, num_workers=2, collate_fn=collate
    )
    total = 0
    for batch in batched:
        lengths = batch["attention_mask"].sum(axis=1)
        for row, sid in enumerate(batch["sample_id"]):
            rec = store.by_sample_id(int(sid))
            n = int(lengths[row])
            assert n == len(rec["input_ids"])
            expected = rec["topk_logits"].astype(np.float32) - rec["logsumexp"][:, None]
            kept = batch["kd_mask"][row, :n].numpy()
            assert kept.sum() == n - 1  # every row but the last predicts a token of the sample
            np.testing.assert_array_equal(
                batch["topk_logprobs"][row, :n].numpy()[kept], expected[kept]
            )
            assert not batch["kd_mask"][row, n:].any()
        total += len(batch["sample_id"])
    assert total == len(store)

    # The store is relocatable: shards are referenced by relative path.
    expected = store[5]["topk_ids"]
    store.close()
    moved = workflow.path("moved_store")
    os.rename(workflow.path("results/demo"), moved)
    np.testing.assert_array_equal(LogitStore(moved)[5]["topk_ids"], expected)


@pytest.mark.slow
def test_reader_installs_as_a_package_without_the_workflow(workflow, tmp_path):
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    # Build from a copy: setuptools writes build/ and egg-info next to the sources.
    shutil.copy2(REPO / "pyproject.toml", source)
    shutil.copytree(
        REPO / "teacher_logits",
        source / "teacher_logits",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    workflow.run("--cores", "2", config={"num_shards": 1, "dataset": {"max_samples": 10}})
    code = (
        "import sys, teacher_logits as m; s = m.LogitStore(sys.argv[1]); "
        "assert len(s) == 10 and s[3]['topk_ids'].shape[1] == 64; "
        "assert not {'snakemake', 'torch', 'transformers'} & set(sys.modules); "
        "print(m.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(workflow.path("results/demo"))],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith(str(target))
    # The workflow itself refuses to run beside such a (not editable) install: its jobs
    # would import that copy instead of the checkout.
    refused = workflow.run("-n", env={"PYTHONPATH": str(target)}, check=False)
    assert refused.returncode == 1
    assert "is installed (not editable)" in refused.stderr and "pip install -e" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_empty_texts_are_dropped_and_listed(workflow, tmp_path):
    rows = ["def f(): pass  # a normal text", "", "   \n\t", "another normal line of text here"] * 3
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"content": t}) + "\n" for t in rows))
    workflow.run(
        "--cores",
        "2",
        config={"dataset": {"path": str(data), "text_field": "content"}, "num_shards": 2},
    )
    manifest = workflow.manifest()
    dropped = {d["sample_id"] for d in manifest["dropped"]}
    assert dropped == {i for i, t in enumerate(rows) if not t.strip()}
    assert manifest["num_samples"] == 6
    store = LogitStore(workflow.path("results/demo"))
    assert set(store.sample_ids.tolist()) == {i for i, t in enumerate(rows) if t.strip()}


PLAN_TIME_ERRORS = [
    (["gpus=0,0"], "listed more than once"),
    (["gpus=0,a"], "not an integer GPU id"),
    (["gpus=0,1,2", "gpus_per_model=2"], "do not divide into groups"),
    (["gpus_per_model=0"], "gpus_per_model"),
    (["num_shards=0"], "num_shards"),
    (["nm_shards=3"], "did you mean 'num_shards'"),
    (["allow_cpu=maybe"], "allow_cpu"),
]


@pytest.mark.parametrize("args,message", PLAN_TIME_ERRORS)
def test_bad_config_fails_at_plan_time(workflow, args, message):
    result = workflow.run("-n", "--config", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "config,message",
    [
        ({"generation": {"top_k": 0}}, "generation.top_k"),
        ({"generation": {"top_kk": 3}}, "did you mean 'generation.top_k'"),
        ({"dataset": {"path": "/no/such/data.jsonl"}}, "dataset.path"),
        ({"teacher": {"path": "/no/such/model"}}, "teacher.path"),
        ({"dataset": {"max_samples": 0}}, "max_samples"),
    ],
)
def test_bad_configfile_fails_at_plan_time(workflow, config, message):
    result = workflow.run("-n", config=config, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def _assert_failed_before_generation(workflow, result, message):
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not workflow.path("results/demo/logs/generate").exists()
    assert not workflow.path("results/demo/shards").exists()


def test_top_k_larger_than_vocab_fails_in_prepare(workflow):
    result = workflow.run("--cores", "2", config={"generation": {"top_k": 100000}}, check=False)
    _assert_failed_before_generation(workflow, result, "larger than the teacher's vocabulary")


@pytest.mark.slow
def test_missing_text_field_fails_in_prepare(workflow, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"body": "some text"}) + "\n")
    result = workflow.run("--cores", "2", config={"dataset": {"path": str(data)}}, check=False)
    _assert_failed_before_generation(workflow, result, "dataset.text_field")


def test_teacher_that_is_not_a_causal_lm_fails_in_prepare(workflow, tmp_path, demo_dir):
    teacher = tmp_path / "encoder"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 100}))
    result = workflow.run("--cores", "2", config={"teacher": {"path": str(teacher)}}, check=False)
    _assert_failed_before_generation(workflow, result, "not a causal language model")


@pytest.mark.slow
def test_teacher_without_weights_fails_in_prepare(workflow, tmp_path, demo_dir):
    teacher = tmp_path / "no_weights"
    teacher.mkdir()
    for item in (demo_dir / "teacher").iterdir():
        if item.suffix != ".safetensors":
            (teacher / item.name).write_bytes(item.read_bytes())
    result = workflow.run("--cores", "2", config={"teacher": {"path": str(teacher)}}, check=False)
    _assert_failed_before_generation(workflow, result, "no weights")


@pytest.mark.slow
def test_teacher_without_tokenizer_fails_in_prepare(workflow, tmp_path, demo_dir):
    teacher = tmp_path / "no_tokenizer"
    teacher.mkdir()
    for name in ("config.json", "model.safetensors"):
        (teacher / name).write_bytes((demo_dir / "teacher" / name).read_bytes())
    result = workflow.run("--cores", "2", config={"teacher": {"path": str(teacher)}}, check=False)
    _assert_failed_before_generation(workflow, result, "tokenizer")


def test_gpus_without_cuda_fail_clearly(workflow):
    result = workflow.run("--cores", "2", "--config", "gpus=0,1", check=False)
    _assert_failed_before_generation(workflow, result, "allow_cpu=true")
