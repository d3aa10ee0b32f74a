"""Appending data: rows added at the end of a JSON Lines file, a file added at the end of
a dataset.path list, or a larger max_samples get new shards numbered after the last;
old shards stay byte-identical and their jobs do not run. A changed old row regenerates
only the shard that holds it."""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_stale_data import verify_deep

from conftest import REPO

sys.path.insert(0, str(REPO))
from teacher_logits.fingerprints import (  # noqa: E402
    config_fingerprint,
    dataset_digest,
    file_record,
    run_config_fingerprint,
)
from teacher_logits.layout import RunLayout  # noqa: E402
from teacher_logits.run_inputs import DataSources, dataset_rows  # noqa: E402
from teacher_logits.shard_plan import appended_shards, load_plan, plan_shards  # noqa: E402

OUT = "results/demo"
# Small rows and few of them: each run takes about a minute on 2 cores.
SMALL = {
    "num_shards": 4,
    "tokenize": {"max_length": 32, "num_proc": 1},
    "generation": {"batch_tokens": 256, "commit_every_s": 0, "threads": 1, "top_k": 8},
}


def corpus_lines(demo_dir: Path, first: int, stop: int) -> str:
    return "".join(demo_dir.joinpath("corpus.jsonl").read_text().splitlines(True)[first:stop])


# --- fast: plan time ------------------------------------------------------------------------


def write_segment_plan(layout: RunLayout, files: list[Path], rows: list[int], shards: int):
    """A segment-0 plan as prepare records it (only what plan time reads)."""
    from teacher_logits.fingerprints import file_record

    cache: dict = {}
    records = [{**file_record(p, cache), "rows": n} for p, n in zip(files, rows)]
    from teacher_logits.fingerprints import dataset_digest

    plan = {
        "num_shards": shards,
        "segment": {"first_row": 0, "end_row": sum(rows), "first_shard": 0, "num_shards": shards},
        "max_samples": None,
        "num_rows": sum(rows),
        "settings": {"dataset": {"split": "train"}},
        "config_fingerprint": "c",
        "shards": [{"index": i, "num_samples": 1, "num_tokens": 1} for i in range(shards)],
        "dataset_files": records,
        "run_inputs": {"settings": {}, "dataset_digest": dataset_digest(files, cache)},
    }
    layout.plan.parent.mkdir(parents=True, exist_ok=True)
    layout.plan.write_text(json.dumps(plan))


def sources(paths, max_samples=None, num_shards=8) -> DataSources:
    return DataSources(tuple(paths), "train", max_samples, num_shards)


def lines(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(start, start + n))


def plan_now(layout, paths, **kwargs):
    cache: dict = {}
    from teacher_logits.fingerprints import dataset_digest

    inputs = {"settings": {}, "dataset_digest": dataset_digest(list(paths), cache)}
    return plan_shards(layout, sources(paths, **kwargs), inputs, cache)


def test_rows_appended_to_a_jsonl_file_become_a_new_segment(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(lines(100))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [100], 8)
    assert plan_now(layout, [data]).segments[-1].index == 0  # unchanged: nothing new
    with open(data, "a") as handle:
        handle.write(lines(10, 100) + "\n")  # a blank line is no row
    plan = plan_now(layout, [data])
    new = plan.segments[-1]
    assert (new.index, new.first_row, new.end_row) == (1, 100, 110)
    assert list(new.shards) == [8]  # ceil(8 * 10 / 100) = 1, numbered after the last
    assert plan.outdated == set() and plan.num_shards == 9
    assert "10 rows appended" in plan.notes[0]


def test_rows_appended_while_prepare_ran_are_planned_at_the_next_run(tmp_path):
    """The head planned rows 0-99; by the time prepare read the file it held 120 rows
    (recorded with the file), of which it tokenized the planned 100."""
    data = tmp_path / "data.jsonl"
    data.write_text(lines(120))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [120], 8)
    plan = json.loads(layout.plan.read_text())
    plan["segment"]["end_row"] = plan["num_rows"] = 100
    layout.plan.write_text(json.dumps(plan))
    new = plan_now(layout, [data]).segments[-1]
    assert (new.index, new.first_row, new.end_row) == (1, 100, 120)


def test_the_segments_stay_known_while_the_first_is_prepared_again(tmp_path):
    """Snakemake deletes prepared/plan.json when segment 0's prepare starts (and when it
    fails): the segments after it come from the records prepare keeps beside the plans."""
    data = tmp_path / "data.jsonl"
    data.write_text(lines(100))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [100], 8)
    with open(data, "a") as handle:
        handle.write(lines(10, 100))
    appended = plan_now(layout, [data]).segments[-1]
    second = json.loads(layout.plan.read_text())
    second["segment"] = {"first_row": 100, "end_row": 110, "first_shard": 8, "num_shards": 1}
    second["shards"] = [{"index": 8, "num_samples": 1, "num_tokens": 1}]
    layout.segment_records_dir.mkdir(parents=True)
    for j, plan in enumerate([json.loads(layout.plan.read_text()), second]):
        layout.segment_plan(j).parent.mkdir(parents=True, exist_ok=True)
        layout.segment_plan(j).write_text(json.dumps(plan))
        layout.segment_record(j).write_text(json.dumps(plan))
    assert appended.index == 1
    layout.plan.unlink()
    kept = plan_now(layout, [data])
    assert [(s.first_row, s.end_row, list(s.shards)) for s in kept.segments] == [
        (0, 100, list(range(8))),
        (100, 110, [8]),
    ]
    assert load_plan(layout)["num_shards"] == 9


def test_an_edit_or_a_reordered_list_is_no_append(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(lines(50))
    b.write_text(lines(50, 50))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [a, b], [50, 50], 4)
    c = tmp_path / "c.jsonl"
    c.write_text(lines(20, 100))
    appended = plan_now(layout, [a, b, c])
    assert appended.outdated == set() and list(appended.segments[-1].shards) == [4]
    reordered = plan_now(layout, [b, a])
    assert reordered.outdated == {0} and len(reordered.segments) == 1
    b.write_text(lines(49, 50) + json.dumps({"text": "edited"}) + "\n")
    assert (
        dataset_rows(sources([a, b]), json.loads(layout.plan.read_text())["dataset_files"], {})[0]
        == 50
    )  # rows of a are unchanged
    assert plan_now(layout, [a, b]).outdated == {0}


def test_a_larger_max_samples_appends_and_a_smaller_one_plans_from_scratch(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(lines(100))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [100], 8)
    plan = json.loads(layout.plan.read_text())
    plan["max_samples"] = plan["segment"]["end_row"] = 60
    layout.plan.write_text(json.dumps(plan))
    larger = plan_now(layout, [data], max_samples=90)
    assert [(s.first_row, s.end_row) for s in larger.segments] == [(0, 60), (60, 90)]
    assert list(larger.segments[1].shards) == [8, 9, 10, 11]  # ceil(8 * 30 / 60)
    smaller = plan_now(layout, [data], max_samples=50, num_shards=3)
    assert len(smaller.segments) == 1 and smaller.segments[0].num_shards == 3
    assert "from scratch" in smaller.notes[0] and smaller.outdated == {0}


def test_num_shards_changed_after_the_first_plan_changes_nothing(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(lines(100))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [100], 8)
    plan = plan_now(layout, [data], num_shards=3)
    assert plan.num_shards == 8 and plan.outdated == set() and plan.notes == []


def test_appended_shard_counts():
    from teacher_logits.shard_plan import Segment

    first = Segment(0, 0, 1000, 0, 8)
    assert [appended_shards(first, n) for n in (1, 100, 125, 126, 1000)] == [1, 1, 1, 2, 8]


def test_a_run_planned_before_appends_keeps_its_config_fingerprint():
    """Its fingerprint hashed dataset.max_samples: the same settings keep it, others not."""
    settings = {"dataset": {"split": "train"}, "generation": {"top_k": 8}}
    legacy = {**settings, "dataset": {"split": "train", "max_samples": 300}}
    earlier = {"config_fingerprint": config_fingerprint(legacy, "t", "k"), "settings": legacy}
    assert run_config_fingerprint(settings, "t", "k", earlier) == earlier["config_fingerprint"]
    other = {**settings, "generation": {"top_k": 4}}
    assert run_config_fingerprint(other, "t", "k", earlier) == config_fingerprint(other, "t", "k")
    assert run_config_fingerprint(settings, "t", "k") == config_fingerprint(settings, "t", "k")


def test_an_edit_in_an_earlier_segment_is_seen_while_the_last_is_unchanged(tmp_path):
    """Each segment's rows are compared with the digest it recorded, on every plan: an
    edit in segment 0's rows outdates segment 0 only, also once a later segment was
    prepared from the edited file (the last segment's record then matches the data)."""
    from teacher_logits.dataset_reads import rows_digests

    data = tmp_path / "data.jsonl"
    data.write_text(lines(30))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [20], 4)
    plans = [json.loads(layout.plan.read_text())]
    for j, (first, end) in enumerate([(0, 20), (20, 30)]):
        plan = {**plans[0], "segment": {"first_row": first, "end_row": end,
                                        "first_shard": 4 * j, "num_shards": 4}}  # fmt: skip
        plan["rows_digest"] = rows_digests([data], [(first, end)], "train", {})[(first, end)]
        layout.segment_plan(j).parent.mkdir(parents=True, exist_ok=True)
        layout.segment_plan(j).write_text(json.dumps(plan))
    assert plan_now(layout, [data]).outdated == set()
    text = data.read_text().replace('"row 3"', '"EDITED row 3"')
    data.write_text(text + lines(5, 30))
    cache: dict = {}
    plan = plan_now_with(layout, [data], cache)
    assert plan.outdated == {0} and "rows of segment 0" in plan.notes[0]
    assert [s.end_row for s in plan.segments] == [20, 30, 35]
    # Segment 1 prepared again from the edited file: segment 0 still differs.
    last = json.loads(layout.segment_plan(1).read_text())
    last["run_inputs"]["dataset_digest"] = dataset_digest([data], {})
    last["dataset_files"] = [{**file_record(data, {}), "rows": 35}]
    layout.segment_plan(1).write_text(json.dumps(last))
    assert plan_now_with(layout, [data], cache).outdated == {0}
    # Unchanged files are not read again: the digests come from the cache.
    os.chmod(data, 0)
    try:
        assert plan_now_with(layout, [data], cache).outdated == {0}
    finally:
        os.chmod(data, 0o644)


def plan_now_with(layout, paths, cache):
    inputs = {"settings": {}, "dataset_digest": dataset_digest(list(paths), cache)}
    return plan_shards(layout, sources(paths), inputs, cache)


def test_blank_appended_rows_get_no_shard_and_an_empty_file_is_one_line(tmp_path):
    from teacher_logits.errors import DataError

    data = tmp_path / "data.jsonl"
    data.write_text(lines(25))
    layout = RunLayout(tmp_path / "out")
    write_segment_plan(layout, [data], [25], 3)
    with open(data, "a") as handle:
        handle.write('{"text": ""}\n{"text": "  \\n "}\n')
    plan = plan_now(layout, [data])
    new = plan.segments[-1]
    assert (new.first_row, new.end_row, new.num_shards) == (25, 27, 0)
    assert "no shard (they are all blank" in plan.notes[-1]
    with open(data, "a") as handle:
        handle.write('{"text": null}\n' + lines(2, 27))  # 3 rows, 2 with text
    assert plan_now(layout, [data]).segments[-1].num_shards == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=f"{empty} has no rows"):
        plan_now(layout, [data, empty])


def test_rows_appended_while_prepare_reads_the_file_are_planned_next(
    demo_dir, tmp_path, monkeypatch
):
    """prepare's size, hash and row count come from one read: rows appended after it (here
    between the read and the datasets library's load) are the next run's, never a plan
    that records more bytes than rows (which failed every later run)."""
    from test_prepare_streaming import base_config, run_prepare

    import teacher_logits.tokenization as tokenization

    data = tmp_path / "data.jsonl"
    data.write_text(corpus_lines(demo_dir, 0, 20))
    config = base_config(data)
    config["tokenize"]["max_length"] = 32
    load_path, size = tokenization.load_path, data.stat().st_size

    def appending_while_read(path, *args, **kwargs):
        if path == data and data.stat().st_size == size:  # rows arrive, the last half written
            with open(path, "a") as handle:
                handle.write(corpus_lines(demo_dir, 20, 33) + '{"text": "half a ro')
        return load_path(path, *args, **kwargs)

    monkeypatch.setattr(tokenization, "load_path", appending_while_read)
    first = run_prepare(config, demo_dir, tmp_path / "out", threads=1)["plan"]
    (record,) = first["dataset_files"]
    assert (first["num_rows"], record["rows"]) == (20, 20)
    assert record["size"] == len(corpus_lines(demo_dir, 0, 20).encode())
    monkeypatch.undo()
    with open(data, "a") as handle:
        handle.write('w"}\n')
    layout = RunLayout(tmp_path / "out")
    cache: dict = {}
    inputs = {**first["run_inputs"], "dataset_digest": dataset_digest([data], cache)}
    plan = plan_shards(layout, sources([data]), inputs, cache)
    new = plan.segments[-1]
    assert (plan.outdated, new.first_row, new.end_row) == (set(), 20, 34), plan.notes
    from teacher_logits.prepare import prepare
    from teacher_logits.settings import PrepareSettings

    settings_config = {
        **config,
        "teacher": {**config["teacher"], "path": str(demo_dir / "teacher")},
    }
    prepare(PrepareSettings.from_config(settings_config, 1), layout, new)
    second = json.loads(layout.segment_plan(1).read_text())
    assert (second["segment"]["first_row"], second["segment"]["end_row"]) == (20, 34)
    assert second["dropped"] == [] and second["num_samples"] == 14


def test_a_half_written_last_line_is_neither_counted_nor_read(demo_dir, tmp_path):
    """A writer paused mid-line (its buffer flushed in blocks): plan time counts the rows
    before that line, and prepare tokenizes exactly those."""
    from test_prepare_streaming import base_config, run_prepare

    from teacher_logits.run_inputs import tail_rows

    data = tmp_path / "data.jsonl"
    data.write_text(corpus_lines(demo_dir, 0, 20) + '{"text": "half a ro')
    assert tail_rows(data, 0) == 20
    config = base_config(data)
    config["tokenize"]["max_length"] = 32
    plan = run_prepare(config, demo_dir, tmp_path / "out", threads=1)["plan"]
    assert (plan["num_rows"], plan["dataset_files"][0]["rows"]) == (20, 20)


# --- end to end -----------------------------------------------------------------------------


def job_counts(dry: str) -> dict:
    table = dry.split("Job stats:")[1].split("total")[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def planned_shards(dry: str) -> list[int]:
    return sorted({int(s) for s in re.findall(r"wildcards: shard=(\d+)", dry)})


def shard_files(wf) -> dict:
    """Each shard: (sha256, mtime_ns, inode)."""
    found = {}
    for path in sorted(wf.path(OUT, "shards").glob("shard_*.h5")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        found[int(path.stem.split("_")[1])] = (digest, stat.st_mtime_ns, stat.st_ino)
    return found


def assert_appended(wf, config, before: dict, new_shards: list[int], rows: int):
    """-n lists exactly the new jobs; the run computes only those; old shards untouched;
    gather indexes every row."""
    dry = wf.run("-n", config=config)
    assert job_counts(dry.stdout) == {
        "prepare": 1,
        "generate": len(new_shards),
        "gather": 1,
        "report_figures": 1,
        "all": 1,
    }, dry.stdout
    assert planned_shards(dry.stdout) == new_shards
    assert "rows appended" in dry.stderr
    wf.run("--cores", "2", config=config)
    after = shard_files(wf)
    assert {i: after[i] for i in before} == before  # same bytes, never rewritten
    assert sorted(after) == sorted(before) + new_shards
    for index in new_shards:
        log = wf.path(OUT, "logs", "generate", f"shard_{index:05d}.log").read_text()
        assert "teacher loaded" in log
    manifest = wf.manifest()
    assert [s["index"] for s in manifest["shards"]] == sorted(after)
    plan = load_plan(RunLayout(wf.path(OUT)))
    assert plan["num_shards"] == len(after) and plan["num_rows"] == rows
    ids = []
    for index in sorted(after):
        with h5py.File(wf.path(OUT, "shards", f"shard_{index:05d}.h5")) as handle:
            ids.append(handle["sample_ids"][:])
    dropped = {d["sample_id"] for d in manifest["dropped"]}
    expected = [r for r in range(rows) if r not in dropped]
    np.testing.assert_array_equal(np.concatenate(ids), expected)  # row numbers, in order
    assert "Nothing to be done" in wf.run("-n", config=config).stdout


@pytest.mark.slow
def test_rows_appended_and_a_larger_max_samples_generate_only_new_shards(
    workflow, demo_dir, tmp_path
):
    data = tmp_path / "data.jsonl"
    data.write_text(corpus_lines(demo_dir, 0, 100))
    config = {**SMALL, "dataset": {"path": str(data), "max_samples": 90}}
    workflow.run("--cores", "2", config=config)
    first = shard_files(workflow)
    assert sorted(first) == [0, 1, 2, 3]

    config["dataset"]["max_samples"] = 100  # 10 more rows: ceil(4 * 10 / 90) = 1 shard
    assert_appended(workflow, config, first, [4], 100)

    with open(data, "a") as handle:  # 10% more rows at the end of the file
        handle.write(corpus_lines(demo_dir, 100, 110))
    config["dataset"]["max_samples"] = None
    assert_appended(workflow, config, shard_files(workflow), [5], 110)

    # num_shards only splits future appends: nothing reruns.
    assert "Nothing to be done" in workflow.run("-n", config={**config, "num_shards": 7}).stdout


@pytest.mark.slow
def test_a_file_added_to_the_dataset_list_generates_only_its_shards(workflow, demo_dir, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(corpus_lines(demo_dir, 0, 60))
    second.write_text(corpus_lines(demo_dir, 60, 90))
    config = {**SMALL, "dataset": {"path": [str(first)]}}
    workflow.run("--cores", "2", config=config)
    config["dataset"]["path"] = [str(first), str(second)]  # 30 rows: ceil(4 * 30 / 60) = 2
    assert_appended(workflow, config, shard_files(workflow), [4, 5], 90)


@pytest.mark.slow
def test_an_edited_old_row_regenerates_only_its_shard(workflow, demo_dir, tmp_path):
    from test_stale_data import edit_row_keeping_length

    data = tmp_path / "data.jsonl"
    data.write_text(corpus_lines(demo_dir, 0, 100))
    config = {**SMALL, "dataset": {"path": str(data)}}
    workflow.run("--cores", "2", config=config)
    with open(data, "a") as handle:
        handle.write(corpus_lines(demo_dir, 100, 110))
    workflow.run("--cores", "2", config=config)
    before = shard_files(workflow)
    plan = load_plan(RunLayout(workflow.path(OUT)))
    row = plan["shards"][0]["num_samples"] + 1  # in shard 1

    edit_row_keeping_length(data, row, demo_dir / "teacher")
    dry = workflow.run("-n", config=config)
    assert "the dataset's content changed" in dry.stderr
    workflow.run("--cores", "2", config=config)
    after = shard_files(workflow)
    assert after[1][0] != before[1][0]
    assert {i: after[i][0] for i in before if i != 1} == {i: before[i][0] for i in before if i != 1}
    log = workflow.path(OUT, "logs", "generate", "shard_00001.log").read_text()
    assert "shard 1: its rows changed since it was made (token digest" in log
    for index in (0, 2, 3):  # segment 0, prepared again: the shards whose rows held
        other = workflow.path(OUT, "logs", "generate", f"shard_{index:05d}.log").read_text()
        assert "reusing the copy an earlier job finished" in other, index
    assert after[4] == before[4]  # segment 1's rows are unchanged: its job did not run
    assert "Nothing to be done" in workflow.run("-n", config=config).stdout


# Float32 throughout: stored values compare with the teacher's own forward to 1e-4.
TINY = {
    "num_shards": 3,
    "teacher": {"dtype": "float32"},
    "storage": {"value_dtype": "float32"},
    "tokenize": {"max_length": 32, "num_proc": 1},
    "generation": {"batch_tokens": 256, "commit_every_s": 0, "threads": 1, "top_k": 8},
}


@pytest.mark.slow
def test_an_edit_planned_with_an_append_never_stays_stale(workflow, demo_dir, tmp_path):
    """Row 3 edited and 5 rows appended; only the appended segment is prepared (as when
    the edit lands after the head planned the append): the next run still sees row 3's
    segment changed, and every stored sample is the teacher's own for the data as it is."""
    import torch
    from test_reader_regather import assert_teacher
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teacher_logits import LogitStore

    data = tmp_path / "data.jsonl"
    data.write_text(corpus_lines(demo_dir, 0, 20))
    config = {**TINY, "dataset": {"path": str(data)}}
    workflow.run("--cores", "2", config=config)
    rows = data.read_text().splitlines(True)
    edited = "EDITED " + json.loads(rows[3])["text"]
    rows[3] = json.dumps({"text": edited}) + "\n"
    data.write_text("".join(rows) + corpus_lines(demo_dir, 20, 25))

    workflow.run("--cores", "1", f"{OUT}/prepared/segment_0001/plan.json", config=config)
    again = workflow.run("--cores", "2", config=config)
    assert "the dataset's content changed (rows of segment 0)" in again.stderr
    assert "Nothing to be done" in workflow.run("-n", config=config).stdout
    logs = {
        i: workflow.path(OUT, "logs", "generate", f"shard_{i:05d}.log").read_text()
        for i in range(4)
    }
    assert "its rows changed since it was made" in logs[0]  # row 3 is in shard 0
    assert all("reusing the copy an earlier job finished" in logs[i] for i in (1, 2))

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "teacher", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    with LogitStore(workflow.path(OUT)) as store:
        assert len(store) == 25
        record = store.by_sample_id(3)
        expected = tokenizer(edited, truncation=True, max_length=32)["input_ids"]
        assert record["input_ids"].tolist() == expected
        for sample_id in (0, 3, 10, 22):
            assert_teacher(model, store.by_sample_id(sample_id), top_k=8)
    assert verify_deep(workflow).returncode == 0


@pytest.mark.slow
def test_blank_rows_appended_are_dropped_and_a_blank_file_is_one_line(workflow, demo_dir, tmp_path):
    grow = tmp_path / "grow.jsonl"
    grow.write_text(corpus_lines(demo_dir, 0, 25))
    config = {**TINY, "num_shards": 2, "dataset": {"path": [str(grow)]}}
    workflow.run("--cores", "2", config=config)
    with open(grow, "a") as handle:
        handle.write('{"text": ""}\n{"text": "   "}\n')
    workflow.run("--cores", "2", config=config)
    manifest = workflow.manifest()
    appended = [d for d in manifest["dropped"] if d["sample_id"] >= 25]
    assert appended == [
        {"sample_id": 25, "reason": "empty or whitespace-only text"},
        {"sample_id": 26, "reason": "empty or whitespace-only text"},
    ]
    assert len(manifest["shards"]) == 2

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    refused = workflow.run("-n", config={**config, "dataset": {"path": [str(grow), str(blank)]}},
                           check=False)  # fmt: skip
    assert refused.returncode != 0
    (line,) = [x for x in refused.stderr.splitlines() if "blank.jsonl" in x]
    assert "has no rows" in line and "remove it from dataset.path" in line

    with open(grow, "a") as handle:  # a real append after the blank one: one more shard
        handle.write(corpus_lines(demo_dir, 25, 30))
    workflow.run("--cores", "2", config=config)
    assert [s["index"] for s in workflow.manifest()["shards"]] == [0, 1, 2]
    with h5py.File(workflow.path(OUT, "shards", "shard_00002.h5")) as handle:
        assert handle["sample_ids"][:].tolist() == list(range(27, 32))
    assert "Nothing to be done" in workflow.run("-n", config=config).stdout
