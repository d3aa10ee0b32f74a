"""Never serve stale or mixed logits: content decides what is redone, not timestamps,
path spellings or Snakemake's metadata."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import test_resume
from conftest import REPO, WORKFLOW_FILES
from test_resume import committed_parts, kill_when

sys.path.insert(0, str(REPO))
from teacher_logits.errors import TeacherError  # noqa: E402
from teacher_logits.fingerprints import (  # noqa: E402
    content_digest,
    teacher_content_digest,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from teacher_logits.generation.shard_job import check_teacher_matches_plan  # noqa: E402
from teacher_logits.layout import RunLayout  # noqa: E402
from teacher_logits.run_inputs import changes_since_plan  # noqa: E402
from teacher_logits.shard_records import (  # noqa: E402
    damaged_shards,
    date_back,
    record_written_shard,
)

# An uninterrupted run's store, as test_resume builds it.
reference = test_resume.reference

SMALL = {
    "num_shards": 2,
    "dataset": {"max_samples": 300},
    "generation": {"batch_tokens": 64, "commit_every_s": 0, "threads": 1},
}
OUT = "results/demo"


def write_keeping_times(path: Path, write) -> None:
    """Change a file's content and put its timestamps back, as cp -p or rsync -a do."""
    before = path.stat()
    write()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def scale_middle_tensor(teacher: Path) -> str:
    """Replace the teacher's weights in place by another model of the same shape: the
    file keeps its size, and file and folder keep their timestamps."""
    weights = teacher / "model.safetensors"
    folder = teacher.stat()
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * 1.5
    size = weights.stat().st_size
    write_keeping_times(weights, lambda: save_file(tensors, weights, metadata={"format": "pt"}))
    os.utime(teacher, ns=(folder.st_atime_ns, folder.st_mtime_ns))
    assert weights.stat().st_size == size
    return name


def edit_row_keeping_length(data: Path, row: int, tokenizer_dir: Path) -> None:
    """Change one letter of ``row`` so its token ids change but not their count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    text = rows[row]["text"]
    ids = tokenizer(text)["input_ids"]
    for i, char in enumerate(text):
        for new in "etaoinsr" if char.isalpha() else "":
            candidate = text[:i] + new + text[i + 1 :]
            changed = tokenizer(candidate)["input_ids"]
            if len(changed) == len(ids) and changed != ids:
                rows[row]["text"] = candidate
                lines = "".join(json.dumps(r) + "\n" for r in rows)
                write_keeping_times(data, lambda text=lines: data.write_text(text))
                return
    raise AssertionError(f"no same-length edit found for row {row}")


def shard_attrs(wf, index: int, out=OUT) -> dict:
    with h5py.File(wf.path(out, "shards", f"shard_{index:05d}.h5")) as handle:
        return dict(handle.attrs)


def stored_sample(wf, sample_id: int, out=OUT) -> dict:
    for path in sorted(wf.path(out, "shards").glob("shard_*.h5")):
        with h5py.File(path) as handle:
            ids = list(handle["sample_ids"][:])
            if sample_id in ids:
                s = ids.index(sample_id)
                r0, r1 = handle["offsets"][s], handle["offsets"][s + 1]
                return {
                    name: handle[name][r0:r1]
                    for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp")
                }
    raise AssertionError(f"sample {sample_id} is in no shard")


def generate_logs(wf, out=OUT) -> str:
    return "".join(p.read_text() for p in sorted(wf.path(out, "logs", "generate").glob("*.log")))


def verify_deep(wf, out=OUT):
    return subprocess.run(
        [sys.executable, "-m", "teacher_logits.verify", str(wf.path(out)), "--deep"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- fast: the fingerprints and records themselves ------------------------------------


def write_safetensors(path: Path, middle_scale: float = 1.0) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "a.first": rng.standard_normal((512, 600)).astype(np.float32),
        "b.middle": rng.standard_normal((512, 600)).astype(np.float32) * middle_scale,
        "c.last": rng.standard_normal((512, 600)).astype(np.float32),
    }
    save_file(tensors, path, metadata={"format": "pt"})


def test_teacher_content_digest_sees_a_tensor_the_edge_hashes_miss(tmp_path):
    """teacher_fingerprint (recorded since format 1) hashes each file's first and last
    MiB; a replaced tensor between them changes only teacher_content_digest."""
    (tmp_path / "config.json").write_text("{}")
    write_safetensors(tmp_path / "model.safetensors")
    before = teacher_fingerprint(tmp_path), teacher_content_digest(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", middle_scale=1.5)
    after = teacher_fingerprint(tmp_path), teacher_content_digest(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size > 3 << 20
    assert after[0] == before[0]
    assert after[1] != before[1]
    # Code for trust_remote_code and tokenizer files count whole.
    (tmp_path / "modeling_mine.py").write_text("SCALE = 1\n")
    with_code = teacher_content_digest(tmp_path)
    (tmp_path / "modeling_mine.py").write_text("SCALE = 2\n")
    assert teacher_content_digest(tmp_path) != with_code


def test_content_digest_sees_an_edit_whose_timestamp_was_put_back(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    cache = {}
    first = content_digest(data, cache)
    assert content_digest(data, cache) == first  # served from the cache
    write_keeping_times(data, lambda: data.write_text('{"text": "one"}\n{"text": "tw0"}\n'))
    assert content_digest(data, cache) != first


def write_plan(layout: RunLayout, plan: dict) -> None:
    layout.plan.parent.mkdir(parents=True, exist_ok=True)
    layout.plan.write_text(json.dumps(plan))


def test_changes_since_the_plan_are_said_in_words(tmp_path):
    layout = RunLayout(tmp_path / "out")
    inputs = {
        "settings": {"generation": {"top_k": 64}},
        "num_shards": 2,
        "teacher_fingerprint": "t1",
        "teacher_content_digest": "w1",
        "tokenizer_fingerprint": "k1",
        "dataset_digest": "d1",
    }
    assert changes_since_plan(layout, inputs) == []  # no plan yet: prepare runs anyway
    write_plan(layout, {"run_inputs": inputs})
    assert changes_since_plan(layout, dict(inputs)) == []
    changed = {**inputs, "settings": {"generation": {"top_k": 32}}, "dataset_digest": "d2"}
    # The dataset is compared by shard_plan, which tells appended rows from changed ones
    # (test_append.py); num_shards only splits future appends.
    assert changes_since_plan(layout, {**changed, "num_shards": 3}) == ["generation.top_k 64 -> 32"]
    weights = {**inputs, "teacher_content_digest": "w2"}
    assert changes_since_plan(layout, weights) == [
        "the teacher's files changed (weights, config, tokenizer or code)"
    ]


def test_a_plan_from_before_run_inputs_is_compared_on_what_it_recorded(tmp_path):
    layout = RunLayout(tmp_path / "out")
    legacy = {"settings": {"x": {"y": 1}}, "num_shards": 2}
    legacy |= {"teacher_fingerprint": "t", "tokenizer_fingerprint": "k"}
    write_plan(layout, legacy)
    inputs = {**legacy, "teacher_content_digest": "w", "dataset_digest": "d"}
    assert changes_since_plan(layout, inputs) == []  # an upgrade reruns nothing
    assert changes_since_plan(layout, {**inputs, "num_shards": 3}) == []  # nor a new num_shards
    changed = {**inputs, "settings": {"x": {"y": 2}}}
    assert changes_since_plan(layout, changed) == ["x.y 1 -> 2"]


def test_a_shard_whose_size_changed_after_its_job_is_named(tmp_path):
    layout = RunLayout(tmp_path / "out")
    shard = layout.shard(1)
    layout.parts_dir(1).mkdir(parents=True)
    shard.write_bytes(b"x" * 1000)
    record_written_shard(shard)
    assert damaged_shards(layout, 3) == {}
    write_keeping_times(shard, lambda: os.truncate(shard, 500))
    (line,) = damaged_shards(layout, 3).values()
    assert "shard 1" in line and "500 bytes" in line and "1,000" in line
    os.utime(shard, (1000, 1000))
    assert date_back(layout, set(), 3) == [line]
    assert shard.stat().st_mtime > 1000  # newer than the store: gather checks it again


def test_generate_refuses_a_plan_made_for_other_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    write_safetensors(tmp_path / "model.safetensors")
    plan = {
        "teacher_fingerprint": teacher_fingerprint(tmp_path),
        "tokenizer_fingerprint": tokenizer_fingerprint(tmp_path),
        "teacher_content_digest": teacher_content_digest(tmp_path),
    }
    check_teacher_matches_plan(tmp_path, plan)
    write_safetensors(tmp_path / "model.safetensors", middle_scale=1.5)
    with pytest.raises(TeacherError, match="changed after prepare planned this run"):
        check_teacher_matches_plan(tmp_path, plan)


def test_snakefile_from_another_directory_keeps_the_demo_beside_the_workflow(workflow, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd, env = workflow.command("-n", "--snakefile", str(workflow.path("Snakefile")))
    result = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    # Found where the workflow keeps it: no job builds it again.
    assert not re.search(r"^demo_teacher\s+\d+", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^prepare\s+1", result.stdout, re.MULTILINE), result.stdout
    assert not (elsewhere / "resources").exists()


# --- end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_changed_setting_is_seen_under_another_spelling_of_output_dir(workflow):
    workflow.run("--cores", "2", config={**SMALL, "output_dir": "results/abs"})
    shutil.rmtree(workflow.path(".snakemake"))
    absolute = str(workflow.path("results", "abs"))
    changed = {**SMALL, "output_dir": absolute, "generation": {**SMALL["generation"], "top_k": 32}}
    dry = workflow.run("-n", config=changed)
    assert "generation.top_k 64 -> 32" in dry.stderr
    workflow.run("--cores", "2", config=changed)
    assert workflow.manifest("results/abs")["top_k"] == 32
    assert {shard_attrs(workflow, i, "results/abs")["top_k"] for i in range(2)} == {32}
    assert verify_deep(workflow, "results/abs").returncode == 0
    assert "Nothing to be done" in workflow.run("-n", config=changed).stdout


@pytest.mark.slow
def test_weights_replaced_in_place_regenerate_every_shard(workflow, demo_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(demo_dir / "teacher", teacher)
    config = {**SMALL, "teacher": {"path": str(teacher)}}
    workflow.run("--cores", "2", config=config)
    before = stored_sample(workflow, 0)
    old_plan = json.loads(workflow.path(OUT, "prepared", "plan.json").read_text())

    scale_middle_tensor(teacher)
    dry = workflow.run("-n", config=config)
    assert "the teacher's" in dry.stderr and "changed" in dry.stderr
    workflow.path(OUT, "shards", "shard_00001.h5").unlink()
    workflow.run("--cores", "2", config=config)

    plan = json.loads(workflow.path(OUT, "prepared", "plan.json").read_text())
    assert plan["teacher_content_digest"] != old_plan["teacher_content_digest"]
    for index in range(2):
        assert (
            shard_attrs(workflow, index)["teacher_content_digest"] == plan["teacher_content_digest"]
        )
    assert "the teacher's files changed" in generate_logs(workflow)
    after = stored_sample(workflow, 0)
    assert not np.array_equal(before["logsumexp"], after["logsumexp"])  # shard 0 is new too
    assert verify_deep(workflow).returncode == 0


@pytest.mark.slow
def test_a_same_length_data_edit_across_a_kill_discards_the_stale_parts(
    workflow, demo_dir, tmp_path, reference
):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(demo_dir.joinpath("corpus.jsonl").read_text().splitlines(True)[:300]))
    config = {**SMALL, "dataset": {"path": str(data)}}
    proc = workflow.start("--cores", "1", config=config)
    kill_when(proc, lambda: len(committed_parts(workflow, shard=1)) >= 2, "two parts of shard 1")
    plan = json.loads(workflow.path(OUT, "prepared", "plan.json").read_text())
    first_of_shard_1 = plan["shards"][0]["num_samples"]  # its rows are in the first part
    edit_row_keeping_length(data, first_of_shard_1, demo_dir / "teacher")

    workflow.run("--cores", "1", config=config)
    assert (
        "the shard's token ids changed"
        in workflow.path(OUT, "logs", "generate", "shard_00001.log").read_text()
    )
    # Bit-identical to an uninterrupted run on the edited data (same threads, float16).
    expected = reference(config)
    got = stored_sample(workflow, first_of_shard_1)
    with h5py.File(workflow.path(OUT, "shards", "shard_00001.h5")) as handle:
        np.testing.assert_array_equal(handle["logsumexp"][:], expected["shard_00001.h5:logsumexp"])
        np.testing.assert_array_equal(handle["topk_ids"][:], expected["shard_00001.h5:topk_ids"])
    assert got["input_ids"].size


@pytest.mark.slow
def test_timestamp_preserving_edits_are_noticed(workflow, demo_dir, tmp_path):
    """A data edit with its mtime put back, and a shard truncated with its mtime put back:
    only the shards they touch are computed again."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(demo_dir.joinpath("corpus.jsonl").read_text().splitlines(True)[:300]))
    config = {**SMALL, "num_shards": 3, "dataset": {"path": str(data)}}
    workflow.run("--cores", "2", config=config)
    shard_1 = workflow.path(OUT, "shards", "shard_00001.h5")
    with h5py.File(shard_1) as handle:
        shard_1_rows = handle["topk_logits"][:]
    before = stored_sample(workflow, 5)

    edit_row_keeping_length(data, 5, demo_dir / "teacher")
    write_keeping_times(shard_1, lambda: os.truncate(shard_1, shard_1.stat().st_size // 2))
    dry = workflow.run("-n", config=config)
    assert "the dataset's content changed" in dry.stderr
    assert "shard 1:" in dry.stderr and "truncated" in dry.stderr
    workflow.run("--cores", "2", config=config)

    log = {
        i: workflow.path(OUT, "logs", "generate", f"shard_0000{i}.log").read_text()
        for i in (0, 1, 2)
    }
    assert "the shard's token ids changed" in log[0]  # its data changed
    assert "it failed validation" in log[1]  # truncated
    assert "reusing the copy an earlier job finished" in log[2]  # untouched: not computed
    after = stored_sample(workflow, 5)
    assert not np.array_equal(before["input_ids"], after["input_ids"])
    with h5py.File(shard_1) as handle:
        np.testing.assert_array_equal(handle["topk_logits"][:], shard_1_rows)
    assert verify_deep(workflow).returncode == 0
    assert "Nothing to be done" in workflow.run("-n", config=config).stdout


@pytest.mark.slow
def test_output_dir_with_spaces_and_unicode(workflow):
    out = "results/with space/rün 1"
    workflow.run("--cores", "2", config={**SMALL, "output_dir": out})
    assert len(workflow.manifest(out)["shards"]) == 2
    assert not workflow.path("results", "with").exists()
    assert sorted(p.name for p in workflow.path("results").iterdir()) == ["with space"]


@pytest.mark.slow
def test_forcerun_of_a_shard_computes_it_from_zero(workflow):
    workflow.run("--cores", "2", config=SMALL)
    shard = f"{OUT}/shards/shard_00000.h5"
    workflow.run("--cores", "2", "--forcerun", shard, config=SMALL)
    log = workflow.path(OUT, "logs", "generate", "shard_00000.log").read_text()
    assert "teacher loaded" in log and "reusing" not in log


def install_workflow(root: Path, source: Path) -> None:
    """Put the workflow files of ``source`` (a checkout) into ``root``, replacing others."""
    for name in WORKFLOW_FILES:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if (source / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(source / name, target, symlinks=True, ignore=ignore)
        elif (source / name).exists():
            shutil.copy2(source / name, target)


@pytest.mark.slow
def test_upgrading_from_the_previous_version_reruns_nothing(workflow, tmp_path):
    """A store made by the workflow before the content checks (commit f8e21d6) is kept."""
    previous = tmp_path / "previous"
    previous.mkdir()
    archive = subprocess.run(
        f"git -C {REPO} archive f8e21d6 | tar -x -C {previous}", shell=True, capture_output=True
    )
    if archive.returncode != 0 or not (previous / "Snakefile").exists():
        pytest.skip("the previous version is not in this clone's history")
    install_workflow(workflow.root, previous)
    workflow.run("--cores", "2", config=SMALL)
    install_workflow(workflow.root, REPO)
    assert "Nothing to be done" in workflow.run("-n", config=SMALL).stdout
    again = workflow.run("--cores", "2", config=SMALL)
    assert "Nothing to be done" in again.stdout + again.stderr
