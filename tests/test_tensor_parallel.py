"""Tensor-parallel teacher (``teacher.parallel: tensor``) on CPU: 2 gloo ranks per group.

- the store equals the pipeline engine's within float32 rounding, for a Llama teacher
  and a Gemma 2 teacher (soft-capped final logits);
- reductions merged across vocabulary slices equal one pass over the whole vocabulary;
- a model that cannot be split fails in prepare with one line naming the fix;
- a rank killed with -9 fails the job within 30 s, leaves no rank and no GPU lock, and
  the rerun resumes to a store bit-identical to an uninterrupted tensor-parallel run;
  a job killed with -9 takes its ranks with it; two groups run at once on one machine;
- the ranks load the teacher folder the job fingerprinted: a ``teacher.path`` symlink
  switched while they start changes nothing, a kept copy from another teacher is not
  reused, and weights overwritten in place while they load fail the job before a row.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig

from teacher_logits import LogitStore
from teacher_logits.errors import TeacherError
from teacher_logits.fingerprints import (
    teacher_content_digest,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from teacher_logits.generation.topk import Reduction, merge_slices, reduce_rows
from teacher_logits.gpus import Claim
from teacher_logits.settings import GenerateSettings
from teacher_logits.tensor_plan import check_tensor_parallel
from teacher_logits.verify import verify

from conftest import REPO, demo_workflow, small_teacher

OUT = "results/demo"

# A float32 teacher, so the two engines differ only in summation order: a rank adds its
# half of each row-parallel matmul and the halves are then all-reduced, where one
# process adds the same terms in another order. A reordered float32 sum moves by a few
# ulps of its terms' magnitude (ulp = 2**-23 * |x|, ~1e-6 at |x| ~ 8), and the demo
# teachers have two to four layers: 1e-4 is ~100x what that allows (measured: <= 4e-7).
TP_ATOL = 1e-4


def run_config(parallel: str, teacher: Path | None = None, **sections) -> dict:
    config = {
        "gpus": "0,1",
        "gpus_per_model": 2,
        "allow_cpu": True,
        "num_shards": 2,
        "teacher": {"dtype": "float32", "parallel": parallel},
        "storage": {"value_dtype": "float32"},
        "dataset": {"max_samples": 24},
        "tokenize": {"max_length": 64},
        "generation": {"threads": 2, "batch_tokens": 256, "top_k": 8, "temperatures": [1, 2]},
    }
    if teacher is not None:
        config["teacher"]["path"] = str(teacher)
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


ROW_NAMES = (
    "topk_ids",
    "topk_logits",
    "logsumexp",
    "entropy",
    "logsumexp_t2.0",
    "target_logprob",
)


def store_rows(root: Path) -> dict:
    """Every row dataset of every shard, concatenated in shard order."""
    rows = {name: [] for name in ROW_NAMES}
    for path in sorted((root / OUT / "shards").glob("shard_*.h5")):
        with h5py.File(path, "r") as f:
            for name in rows:
                rows[name].append(f[name][...])
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def assert_close_stores(pipeline: dict, tensor: dict) -> None:
    from teacher_logits.store.codec import decode_topk

    p_ids, p_logits = decode_topk(pipeline["topk_ids"], pipeline["topk_logits"])
    t_ids, t_logits = decode_topk(tensor["topk_ids"], tensor["topk_logits"])
    for name in ("logsumexp", "entropy", "logsumexp_t2.0", "target_logprob"):
        np.testing.assert_allclose(tensor[name], pipeline[name], rtol=0, atol=TP_ATOL, err_msg=name)
    np.testing.assert_allclose(t_logits, p_logits, rtol=0, atol=TP_ATOL)
    # Ids may differ only where neighbouring logits are closer than the bound (a swap).
    rows, ranks = np.nonzero(t_ids != p_ids)
    if len(rows):
        gap_below = np.abs(p_logits[rows, ranks] - p_logits[rows, np.maximum(ranks - 1, 0)])
        upper = np.minimum(ranks + 1, p_logits.shape[1] - 1)
        gap_above = np.abs(p_logits[rows, ranks] - p_logits[rows, upper])
        assert (np.minimum(gap_below, gap_above) <= 2 * TP_ATOL).all(), "ids differ, no tie"


def claims_of(root: Path) -> list[dict]:
    claims = []
    for path in sorted((root / OUT / "shards").glob("shard_*.h5")):
        with h5py.File(path, "r") as f:
            claims += json.loads(f.attrs["claims"])
    return claims


# --- fast: the pieces --------------------------------------------------------------


def test_slices_merged_equal_one_pass_over_the_whole_vocabulary():
    """Top-k, logsumexp, entropy and tempered logsumexp merged from 3 uneven vocabulary
    slices against a float64 computation over the whole vocabulary."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 1000, generator=generator) * 4
    logits[0, 5:] = -torch.inf  # masked logits: two slices of this row hold no probability
    reduction = Reduction(top_k=16, chunk_rows=7, with_entropy=True, temperatures=(2.0,))
    bounds = [0, 300, 700, 1000]
    slices = [
        reduce_rows(logits[:, a:b].clone(), None, reduction, "cpu", id_offset=a)
        for a, b in zip(bounds, bounds[1:])
    ]
    merged = merge_slices(slices, 16)
    exact = logits.double()
    np.testing.assert_allclose(merged.logsumexp, torch.logsumexp(exact, -1), atol=2e-5)
    np.testing.assert_allclose(merged.logsumexp_t[2.0], torch.logsumexp(exact / 2, -1), atol=2e-5)
    probs = torch.softmax(exact, -1)
    entropy = -(probs * torch.log(probs).nan_to_num(0.0, neginf=0.0)).sum(-1)
    np.testing.assert_allclose(merged.entropy, entropy, atol=2e-5)
    values, ids = torch.topk(exact, 16, dim=-1)
    np.testing.assert_allclose(merged.logits[1:], values[1:], atol=1e-6)
    assert torch.equal(merged.ids[1:].long(), ids[1:])
    assert merged.ids.dtype == torch.int32


def test_merge_without_entropy_stores_zeros():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    reduction = Reduction(top_k=4, chunk_rows=4, with_entropy=False)
    halves = [
        reduce_rows(logits[:, :50].clone(), None, reduction, "cpu"),
        reduce_rows(logits[:, 50:].clone(), None, reduction, "cpu", id_offset=50),
    ]
    assert torch.equal(merge_slices(halves, 4, with_entropy=False).entropy, torch.zeros(4))


def _config(model_type, **fields):
    return AutoConfig.for_model(model_type, **fields)


@pytest.mark.parametrize(
    "config, ranks, message",
    [
        (_config("gpt2", n_head=4), 2, "no tensor-parallel plan for 'gpt2' models"),
        (
            _config("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48),
            2,
            "3 key/value heads do not divide by 2",
        ),
        (
            _config("llama", num_attention_heads=6, num_key_value_heads=6, hidden_size=48),
            4,
            "6 attention heads do not divide by 4",
        ),
        (_config("llama", vocab_size=100), 4, "fewer than generation.top_k=64 ids"),
    ],
)
def test_models_that_cannot_be_split_are_refused_with_the_fix(config, ranks, message):
    with pytest.raises(TeacherError, match=message) as info:
        check_tensor_parallel(config, ranks, top_k=64)
    assert "teacher.parallel: pipeline" in str(info.value)


def test_remote_code_without_a_plan_is_named():
    config = _config("gpt2")
    config.auto_map = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    with pytest.raises(TeacherError, match=r"\(remote code\)"):
        check_tensor_parallel(config, 2, top_k=8)


def test_a_splittable_teacher_passes():
    config = _config("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    check_tensor_parallel(config, 2, top_k=64)
    check_tensor_parallel(_config("gemma2", num_attention_heads=4, num_key_value_heads=2), 2, 8)


@pytest.mark.slow
def test_prepare_refuses_gpt2_in_tensor_mode_and_the_dry_run_knows_the_key(
    workflow, demo_dir, tmp_path
):
    teacher = small_teacher("gpt2", demo_dir, tmp_path / "gpt2")
    config = run_config("tensor", teacher=teacher)
    dry = workflow.run("-n", "--cores", "2", config=config)
    assert "generate" in dry.stdout
    run = workflow.run("--cores", "2", config=config, check=False)
    assert run.returncode != 0
    log = workflow.path(OUT, "logs", "prepare.log").read_text()
    assert "no tensor-parallel plan for 'gpt2' models; set teacher.parallel: pipeline" in log
    assert not list(workflow.path(OUT).glob("shards/shard_*.h5"))
    bad = workflow.run("-n", config={"teacher": {"parallel": "tensors"}}, check=False)
    assert bad.returncode != 0 and "parallel" in bad.stdout + bad.stderr


def test_the_pipeline_loads_the_folder_the_job_fingerprinted(demo_dir, tmp_path):
    from teacher_logits.generation.shard_job import planned_engine

    link = tmp_path / "teacher"
    link.symlink_to(demo_dir / "teacher")
    plan = {
        "teacher_fingerprint": teacher_fingerprint(link),
        "tokenizer_fingerprint": tokenizer_fingerprint(link),
        "teacher_content_digest": teacher_content_digest(link),
    }
    settings = engine_settings(link)
    settings = replace(settings, teacher=replace(settings.teacher, parallel="pipeline"))
    with planned_engine(settings, Claim("", 0), plan) as engine:
        assert engine.description == "pipeline"
        assert engine.model.name_or_path == str((demo_dir / "teacher").resolve())


# --- slow: whole runs -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tensor_parallel_store_matches_the_pipeline(tmp_path, demo_dir, arch):
    # Gemma 2 with 3 unused vocabulary rows: 2,051 ids split unevenly (1,026 + 1,025).
    teacher = None if arch == "llama" else small_teacher(arch, demo_dir, tmp_path / arch, 3)
    pipeline = demo_workflow(tmp_path / "pipeline", demo_dir)
    pipeline.run("--cores", "2", config=run_config("pipeline", teacher))
    tensor = demo_workflow(tmp_path / "tensor", demo_dir)
    tensor.run("--cores", "2", config=run_config("tensor", teacher))
    assert {c["engine"] for c in claims_of(pipeline.root)} == {"pipeline"}
    assert {c["engine"] for c in claims_of(tensor.root)} == {"tensor x2"}
    log = tensor.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert "2 ranks of 1 threads" in log  # generation.threads 2 // gpus_per_model 2
    # Gemma 2 too: each rank applies the soft-capping to its own slice of the head.
    last = "1024..2047" if arch == "llama" else "1026..2050"
    assert f"rank 1: ids {last} via its rows of the output head" in log
    assert_close_stores(store_rows(pipeline.root), store_rows(tensor.root))
    assert_target_logprob_is_the_teachers(tensor.path(OUT), teacher or demo_dir / "teacher")


def assert_target_logprob_is_the_teachers(store_root: Path, teacher: Path) -> None:
    """Each record's target_logprob is log_softmax(model(ids).logits)[t, ids[t+1]] of the
    float32 teacher recomputed here (within TP_ATOL: the ranks' slices merge in another
    order of float32 sums), NaN on the last row; its text and spans are stored too."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with LogitStore(store_root) as store:
        assert store.has_cross_tokenizer_fields
        for i in range(0, len(store), 5):
            rec = store[i]
            ids = torch.from_numpy(rec["input_ids"].astype(np.int64))
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
            expected = logprobs[torch.arange(len(ids) - 1), ids[1:]].numpy()
            assert np.isnan(rec["target_logprob"][-1])
            np.testing.assert_allclose(rec["target_logprob"][:-1], expected, rtol=0, atol=TP_ATOL)
            assert rec["token_offsets"][-1, 1] <= len(rec["text"].encode())


# Run by every Python process that finds it on PYTHONPATH, so by each rank as it starts,
# after the job's last fingerprint check and before the rank reads a byte of the teacher:
# the first rank does RANK_START_ACTION while the others wait for it to be done.
RANK_START_HOOK = """
import os, shutil, sys, time
action = os.environ.get("RANK_START_ACTION")
if action and "teacher_logits.generation.tensor_rank" in sys.orig_argv:
    kind, source, target = action.split("|")
    marker = os.path.join(os.path.dirname(__file__), kind)
    try:
        os.close(os.open(marker + ".claimed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        while not os.path.exists(marker + ".done"):
            time.sleep(0.01)
    else:
        if kind == "link":  # ln -sfn source target
            os.symlink(source, target + ".new")
            os.replace(target + ".new", target)
        else:  # cp source target: the same file, overwritten in place
            shutil.copyfile(source, target)
        open(marker + ".done", "w").close()
"""


def another_teacher(teacher: Path, out: Path) -> Path:
    """A copy of ``teacher`` with every weight scaled: same shapes, other logits."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(teacher, out)
    tensors = {name: t * 1.25 for name, t in load_file(out / "model.safetensors").items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def at_rank_start(tmp_path: Path, kind: str, source: Path, target: Path) -> dict:
    """The environment under which the first rank to start does ``kind`` (``link``: ln
    -sfn, ``copy``: cp, of ``source`` to ``target``) before any rank loads the teacher."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(RANK_START_HOOK)
    return {"PYTHONPATH": str(hooks), "RANK_START_ACTION": f"{kind}|{source}|{target}"}


def engine_settings(teacher: Path) -> GenerateSettings:
    """A tensor-parallel generate job's settings, as the workflow resolves them."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(gpus="0,1", gpus_per_model=2, allow_cpu=True, gpu_assignment="local")
    config["teacher"].update(path=str(teacher), dtype="float32", parallel="tensor")
    config["generation"]["top_k"] = 8
    return GenerateSettings.from_config(config, threads=2)


@pytest.mark.slow
def test_a_rank_dead_between_batches_fails_the_next_batch_naming_it(
    demo_dir, tmp_path, monkeypatch
):
    """Its ranks were given a symlink, switched to another teacher as they start: they
    load the folder it named when the engine started."""
    from transformers import AutoModelForCausalLM

    from teacher_logits.generation.engine import open_engine
    from teacher_logits.generation.tensor_engine import RankFailed

    link = tmp_path / "teacher"
    link.symlink_to(demo_dir / "teacher")
    other = another_teacher(demo_dir / "teacher", tmp_path / "other")
    for name, value in at_rank_start(tmp_path, "link", other, link).items():
        monkeypatch.setenv(name, value)
    ids = torch.arange(3, 35).reshape(2, 16)
    mask = torch.ones_like(ids)
    teacher = AutoModelForCausalLM.from_pretrained(demo_dir / "teacher", dtype=torch.float32)
    with torch.inference_mode():
        expected = torch.topk(teacher(ids, attention_mask=mask).logits.flatten(0, 1), 8).values
    with open_engine(engine_settings(link), Claim("", 0)) as engine:
        rows = engine(ids, mask)
        assert link.resolve() == other.resolve()  # switched before the ranks loaded
        torch.testing.assert_close(rows.logits, expected, atol=TP_ATOL, rtol=0)
        victim = engine.ranks[1].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        started = time.time()
        with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            engine(ids, mask)
        assert time.time() - started < 30
    assert all(rank.process.poll() is not None for rank in engine.ranks)


def _processes(marker: str, lock_dir: Path) -> list[int]:
    """Pids whose command line has ``marker`` and that run under this test's lock dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and str(lock_dir).encode() in environ:
            found.append(int(entry.name))
    return found


def _locks_free(lock_dir: Path) -> bool:
    for path in lock_dir.glob("gpu-*.lock"):
        with open(path, "r+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def _wait_for(condition, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


RANK = "teacher_logits.generation.tensor_rank"
# Long enough shards of small windows, each its own part: a kill lands mid-shard.
KILL_RUN = dict(
    num_shards=1,
    dataset={"max_samples": 120},
    generation={"batch_tokens": 64, "commit_every_s": 0, "threads": 2},
)


def start_until_parts(wf, parts: int):
    """Start a tensor-parallel run in the background; return it and its two ranks' pids
    once shard 0 has ``parts`` committed parts."""
    proc = wf.start("--cores", "2", config=run_config("tensor", **KILL_RUN))
    folder = wf.path(OUT, "shards", "shard_00000.parts")
    _wait_for(lambda: len(list(folder.glob("part_*.h5"))) >= parts, f"{parts} committed parts")
    ranks = _processes(RANK, wf.lock_dir)
    assert len(ranks) == 2
    return proc, ranks


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_fast_and_the_rerun_is_bit_identical(tmp_path, demo_dir):
    reference = demo_workflow(tmp_path / "reference", demo_dir)
    reference.run("--cores", "2", config=run_config("tensor", **KILL_RUN))

    wf = demo_workflow(tmp_path / "killed", demo_dir)
    proc, ranks = start_until_parts(wf, 2)
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.time()
    jobs = lambda: _processes("generate.py", wf.lock_dir)  # noqa: E731
    _wait_for(lambda: not jobs() and not _processes(RANK, wf.lock_dir), "the job to fail", 60)
    assert time.time() - killed_at < 30
    proc.wait(timeout=120)
    assert proc.returncode != 0
    log = wf.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert "tensor-parallel rank 1" in log and "was killed by SIGKILL" in log
    assert "shard_00000.ranks.log" in log  # where the ranks' own output went
    assert _locks_free(wf.lock_dir)

    wf.run("--cores", "2", config=run_config("tensor", **KILL_RUN))
    assert len(claims_of(wf.root)) == 2  # the killed claim's rows were kept
    resumed, uninterrupted = store_rows(wf.root), store_rows(reference.root)
    for name in ROW_NAMES:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


@pytest.mark.slow
def test_a_killed_job_takes_its_ranks_and_locks_with_it(tmp_path, demo_dir):
    wf = demo_workflow(tmp_path / "wf", demo_dir)
    proc, ranks = start_until_parts(wf, 1)
    locks = {str(p) for p in wf.lock_dir.glob("gpu-*.lock")}
    assert len(locks) == 2
    for rank in ranks:  # each rank holds the group's locks too (inherited descriptors)
        assert locks <= {os.readlink(fd) for fd in Path(f"/proc/{rank}/fd").iterdir()}
    jobs = [
        p for p in _processes("generate.py", wf.lock_dir) if p not in _processes(RANK, wf.lock_dir)
    ]
    for job in jobs:
        os.kill(job, signal.SIGKILL)
    _wait_for(lambda: not _processes(RANK, wf.lock_dir), "the ranks to die", 30)
    _wait_for(lambda: _locks_free(wf.lock_dir), "the locks to be free", 30)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_two_groups_run_tensor_parallel_at_once(tmp_path, demo_dir):
    wf = demo_workflow(tmp_path / "wf", demo_dir)
    config = run_config("tensor", gpus="0,1,2,3", dataset={"max_samples": 80})
    config["generation"]["threads"] = 1
    wf.run("--cores", "2", "--resources", "gpu=4", config=config)
    claims = claims_of(wf.root)
    assert {c["cuda_visible_devices"] for c in claims} == {"0,1", "2,3"}
    first, second = sorted(claims, key=lambda c: c["started_at"])
    assert second["started_at"] < first["finished_at"], "the two groups did not overlap"


@pytest.mark.slow
def test_tensor_parallel_draws_follow_the_teachers_tail(tmp_path, demo_dir):
    """topk+sampled under two ranks: each rank draws over its own slice and the job
    merges by the slices' masses. The store validates, every draw lies outside its
    row's top-k, and the draws pooled over all rows fit the teacher's own tail
    distributions (float64 softmax of ``model(...).logits``, top-k removed): a seeded
    chi-square test, conservative for rows with different distributions."""
    from test_sampling import chi_square_p_value
    from transformers import AutoModelForCausalLM

    wf = demo_workflow(tmp_path / "tensor", demo_dir)
    wf.run("--cores", "2", config=run_config("tensor", generation={"mode": "topk+sampled"}))
    assert verify(wf.path(OUT), deep=True, workers=1) == []
    teacher = AutoModelForCausalLM.from_pretrained(demo_dir / "teacher", dtype=torch.float32)
    observed, expected = np.zeros(2048), np.zeros(2048)
    with LogitStore(wf.path(OUT)) as store:
        for i in range(len(store)):
            rec = store[i]
            with torch.inference_mode():
                ids = torch.from_numpy(rec["input_ids"].astype(np.int64))[None]
                probs = torch.softmax(teacher(input_ids=ids).logits[0].double(), -1).numpy()
            for row, (drawn, counts, top) in enumerate(
                zip(rec["sampled_ids"], rec["sampled_counts"], rec["topk_ids"])
            ):
                assert not set(drawn[counts > 0]) & set(top)
                np.add.at(observed, drawn, counts)
                tail = probs[row].copy()
                tail[top] = 0
                expected += counts.sum() * tail / tail.sum()
    cells = expected >= 5
    pooled_obs = np.append(observed[cells], observed[~cells].sum())
    pooled_exp = np.append(expected[cells], expected[~cells].sum())
    assert chi_square_p_value(pooled_obs, pooled_exp) > 1e-4


def assert_store_from(wf, teacher: Path) -> None:
    """Every stored sample holds ``teacher``'s own numbers, recomputed here."""
    from test_reader_regather import assert_teacher
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with LogitStore(wf.path(OUT)) as store:
        assert len(store) == 8
        for i in range(len(store)):
            assert_teacher(model, store[i], top_k=8)
    with h5py.File(wf.path(OUT, "shards", "shard_00000.h5"), "r") as shard:
        assert shard.attrs["teacher_content_digest"] == teacher_content_digest(teacher)


@pytest.mark.slow
def test_the_ranks_load_the_teacher_the_job_fingerprinted(tmp_path, demo_dir):
    teacher_a = demo_dir / "teacher"
    teacher_b = another_teacher(teacher_a, tmp_path / "teacher_b")
    link = tmp_path / "teacher"
    link.symlink_to(teacher_a)

    wf = demo_workflow(tmp_path, demo_dir)
    config = run_config("tensor", link, num_shards=1, dataset={"max_samples": 8})
    # The link switched to B while the ranks start: they load A, the folder the job
    # fingerprinted, and the store says so.
    wf.run("--cores", "2", config=config, env=at_rank_start(tmp_path, "link", teacher_b, link))
    assert link.resolve() == teacher_b.resolve()
    assert_store_from(wf, teacher_a)
    assert verify(wf.path(OUT), deep=True, workers=1) == []

    # The link now names B: the kept copy, recorded as A's, is computed again with B.
    wf.run("--cores", "2", config=config)
    log = wf.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert "discarding the finished copy of shard_00000.parts" in log
    assert "reusing the copy" not in log
    assert_store_from(wf, teacher_b)

    # B's weights overwritten in place (by A's) while the ranks load: the job compares
    # the files with its plan once they are loaded, and fails before a row is written.
    weights = teacher_b / "model.safetensors"
    failed = wf.run(
        "--cores",
        "2",
        config={**config, "force_regenerate": True},
        env=at_rank_start(tmp_path, "copy", teacher_a / "model.safetensors", weights),
        check=False,
    )
    assert failed.returncode != 0
    log = wf.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert f"teacher.path: the files in {teacher_b.resolve()} changed after prepare" in log
    assert not list(wf.path(OUT, "shards", "shard_00000.parts").glob("part_*.h5"))
