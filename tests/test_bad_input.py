"""Bad input: one clear line with the cause and the fix, before any generation job.

Each case runs the real command (not a dry run), so it also proves that nothing
was generated. Cases checked at plan time fail in about a second; the ones that
need the data or the teacher fail in `prepare`. (More cases live in
test_workflow.py: PLAN_TIME_ERRORS, test_bad_configfile_fails_at_plan_time and
the prepare tests.)
"""

from __future__ import annotations

import json
import shutil

import pytest

# Each case: (id, builder) where builder(tmp_path, demo_dir) returns
# (extra command-line args, config file contents or None, extra env, cause, fix).


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _args(*args, cause, fix, env=None):
    return lambda tmp, demo: (["--config", *args], None, env or {}, cause, fix)


def _cfg(config, cause, fix, env=None):
    return lambda tmp, demo: ([], config, env or {}, cause, fix)


def _output_dir_under_a_file(tmp, demo):
    (tmp / "a_file").write_text("not a folder")
    return (
        [],
        {"output_dir": str(tmp / "a_file" / "store")},
        {},
        "cannot be created because",
        "is a file, not a folder; choose another output_dir",
    )


def _teacher_is_a_file(tmp, demo):
    return (
        [],
        {"teacher": {"path": str(demo / "teacher" / "config.json")}},
        {},
        "teacher.path:",
        "is a file; give the model's folder",
    )


def _dataset_folder_that_is_no_dataset(tmp, demo):
    folder = tmp / "my_texts"
    folder.mkdir()
    (folder / "part-0.txt").write_text("some text\n")
    return (
        [],
        {"dataset": {"path": str(folder)}},
        {},
        "is a folder but not a save_to_disk dataset",
        "give a .jsonl/.json/.parquet/.arrow file",
    )


def _empty_dataset_file(tmp, demo):
    (tmp / "empty.jsonl").write_text("")
    return (
        [],
        {"dataset": {"path": str(tmp / "empty.jsonl")}},
        {},
        "is empty (0 bytes)",
        "file or a folder written by save_to_disk",
    )


def _parquet_without_magic(tmp, demo):
    (tmp / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 100)  # cut off before its footer
    return (
        [],
        {"dataset": {"path": str(tmp / "broken.parquet")}},
        {},
        "is not a valid Parquet file",
        "copy it again or re-export it",
    )


def _top_k_over_vocab(tmp, demo):
    return (
        [],
        {"teacher": {"path": str(demo / "teacher")}, "generation": {"top_k": 10**6}},
        {},
        "generation.top_k=1000000 is larger than the teacher's vocabulary",
        "use a top_k of at most",
    )


PLAN_TIME = [
    ("gpus_negative", _args("gpus=-1", cause="gpus: -1 is negative", fix="GPU ids start at 0")),
    (
        "gpus_range",
        _args(
            "gpus=0-3",
            cause="'0-3' is not an integer GPU id",
            fix="give integer ids like gpus=0,1,2,3",
        ),
    ),
    ("gpus_boolean", _cfg({"gpus": True}, "gpus: True is not of type", "set gpus to a string")),
    (
        "gpus_mapping",
        _cfg(
            {"gpus": {"a": 1}},
            "gpus: {'a': 1} is not of type",
            '("" for CPU, "0,1,2,3", 0, or a list)',
        ),
    ),
    (
        "gpus_nested_list",
        _cfg({"gpus": [0, [1]]}, "[1] is not an integer GPU id", "give integer ids"),
    ),
    (
        "gpus_beyond_shell_mask",
        _args(
            "gpus=0,1",
            env={"CUDA_VISIBLE_DEVICES": "3"},
            cause="CUDA_VISIBLE_DEVICES=3 in your shell exposes only 1",
            fix="use smaller ids or unset CUDA_VISIBLE_DEVICES",
        ),
    ),
    (
        "gpus_with_empty_shell_mask",
        _args(
            "gpus=0",
            env={"CUDA_VISIBLE_DEVICES": ""},
            cause="CUDA_VISIBLE_DEVICES is set but empty",
            fix="run with gpus= for CPU",
        ),
    ),
    (
        "gpus_per_model_word",
        _args(
            "gpus_per_model=two",
            cause="gpus_per_model: 'two' is not of",
            fix="set gpus_per_model to a whole number",
        ),
    ),
    (
        "gpus_per_model_fraction",
        _cfg(
            {"gpus_per_model": 1.5},
            "gpus_per_model: 1.5 is not of",
            "set gpus_per_model to a whole number",
        ),
    ),
    (
        "gpus_per_model_too_big",
        _args(
            "gpus=0",
            "gpus_per_model=2",
            cause="do not divide into groups",
            fix="list a multiple of 2 GPUs",
        ),
    ),
    (
        "gpu_assignment_unknown",
        _args(
            "gpu_assignment=slurm",
            cause="gpu_assignment: 'slurm'",
            fix="use one of: auto, local, scheduler",
        ),
    ),
    (
        "num_shards_word",
        _args(
            "num_shards=many",
            cause="num_shards: 'many' is not of type",
            fix="set num_shards to a whole number",
        ),
    ),
    (
        "force_regenerate_word",
        _args(
            "force_regenerate=sometimes",
            cause="force_regenerate:",
            fix="set force_regenerate to true or false",
        ),
    ),
    (
        "teacher_as_a_string",
        _cfg(
            {"teacher": "/models/llama"},
            "teacher: '/models/llama' is not of",
            "write it as 'teacher: {path: /models/llama}'",
        ),
    ),
    (
        "dtype_unknown",
        _cfg(
            {"teacher": {"dtype": "fp16"}},
            "teacher.dtype: 'fp16'",
            "use one of: bfloat16, float16, float32, auto",
        ),
    ),
    (
        "compression_unknown",
        _cfg(
            {"storage": {"compression": "brotli"}},
            "storage.compression: 'brotli'",
            "use one of: default, zstd",
        ),
    ),
    (
        "max_length_negative",
        _cfg(
            {"tokenize": {"max_length": -3}}, "tokenize.max_length: -3", "use a value of at least 1"
        ),
    ),
    (
        "max_samples_negative",
        _cfg(
            {"dataset": {"max_samples": -5}}, "dataset.max_samples: -5", "use a value of at least 0"
        ),
    ),
    (
        "text_field_empty",
        _cfg(
            {"dataset": {"text_field": ""}},
            "dataset.text_field:",
            "give dataset.text_field a non-empty value",
        ),
    ),
    (
        "nested_typo",
        _cfg(
            {"dataset": {"text_feild": "body"}},
            "unknown config key 'dataset.text_feild'",
            "did you mean 'dataset.text_field'?",
        ),
    ),
    (
        "output_dir_empty",
        _args("output_dir=", cause="output_dir is empty", fix="set output_dir to a string"),
    ),
    ("output_dir_under_a_file", _output_dir_under_a_file),
    ("teacher_is_a_file", _teacher_is_a_file),
    ("dataset_folder_that_is_no_dataset", _dataset_folder_that_is_no_dataset),
    ("empty_dataset_file", _empty_dataset_file),
    ("parquet_without_magic", _parquet_without_magic),
    ("top_k_over_vocab", _top_k_over_vocab),
]


def _parquet_with_garbage_inside(tmp, demo):
    (tmp / "garbage.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    return (
        [],
        {"dataset": {"path": str(tmp / "garbage.parquet")}},
        {},
        "dataset.path: could not read",
        "check that it is valid JSON Lines / JSON / Parquet",
    )


def _jsonl_that_is_not_json(tmp, demo):
    (tmp / "notes.jsonl").write_text("first line of notes\nsecond line\n")
    return (
        [],
        {"dataset": {"path": str(tmp / "notes.jsonl")}},
        {},
        "dataset.path: could not read",
        "check that it is valid JSON Lines",
    )


def _numbers_as_texts(tmp, demo):
    path = _jsonl(tmp / "numbers.jsonl", [{"text": i} for i in range(5)])
    return (
        [],
        {"dataset": {"path": path}},
        {},
        "dataset row 0: text field holds int, not a string",
        "point dataset.text_field at a text column",
    )


def _lists_as_texts(tmp, demo):
    path = _jsonl(tmp / "lists.jsonl", [{"text": ["a", "b"]} for _ in range(3)])
    return (
        [],
        {"dataset": {"path": path}},
        {},
        "text field holds list, not a string",
        "point dataset.text_field at a text column",
    )


def _all_texts_empty(tmp, demo):
    path = _jsonl(tmp / "blank.jsonl", [{"text": t} for t in ("", "   ", "\n\t")])
    return (
        [],
        {"dataset": {"path": path}},
        {},
        "all 3 rows of",
        "check that dataset.text_field names the column",
    )


def _more_shards_than_samples(tmp, demo):
    path = _jsonl(tmp / "three.jsonl", [{"text": f"sample number {i}"} for i in range(3)])
    return (
        [],
        {"dataset": {"path": path}, "num_shards": 5},
        {},
        "num_shards=5 is more than the 3 samples kept",
        "use num_shards=3 or fewer",
    )


PREPARE_TIME = [
    ("parquet_with_garbage_inside", _parquet_with_garbage_inside),
    ("jsonl_that_is_not_json", _jsonl_that_is_not_json),
    ("numbers_as_texts", _numbers_as_texts),
    ("lists_as_texts", _lists_as_texts),
    ("all_texts_empty", _all_texts_empty),
    ("more_shards_than_samples", _more_shards_than_samples),
]


def _run_case(workflow, tmp_path, demo_dir, build):
    args, config, env, cause, fix = build(tmp_path, demo_dir)
    result = workflow.run("--cores", "2", *args, config=config, env=env, check=False)
    err = result.stderr
    assert result.returncode != 0, f"accepted bad input:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-4000:]
    lines = [line for line in err.splitlines() if cause in line]
    assert lines, f"no line says {cause!r}:\n{err[-3000:]}"
    # Cause and fix on the same line: one line tells the user everything.
    assert any(fix in line for line in lines), f"no fix {fix!r} in: {lines}"
    # Nothing was generated, not even started.
    assert not workflow.path("results/demo/logs/generate").exists()
    assert not workflow.path("results/demo/shards").exists()
    return result


@pytest.mark.parametrize("build", [b for _, b in PLAN_TIME], ids=[i for i, _ in PLAN_TIME])
def test_bad_input_fails_at_plan_time(workflow, tmp_path, demo_dir, build):
    result = _run_case(workflow, tmp_path, demo_dir, build)
    assert "Config error: " in result.stderr
    # Plan time: no job of any kind ran.
    assert not workflow.path("results/demo/logs").exists()


@pytest.mark.parametrize("build", [b for _, b in PREPARE_TIME], ids=[i for i, _ in PREPARE_TIME])
@pytest.mark.slow
def test_bad_data_fails_in_prepare(workflow, tmp_path, demo_dir, build):
    result = _run_case(workflow, tmp_path, demo_dir, build)
    assert "[prepare] ERROR: " in result.stderr


@pytest.mark.slow
def test_null_texts_are_dropped_not_fatal(workflow, tmp_path):
    rows = [{"text": "a normal line of text"}, {"text": None}, {"text": "another line"}]
    path = _jsonl(tmp_path / "nulls.jsonl", rows)
    workflow.run("--cores", "2", config={"dataset": {"path": path}, "num_shards": 1})
    manifest = workflow.manifest()
    assert manifest["dropped"] == [{"sample_id": 1, "reason": "text is missing (null)"}]
    assert manifest["num_samples"] == 2


def test_a_save_to_disk_folder_passes_the_plan_time_check(workflow, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one text", "two texts"]}).save_to_disk(str(folder))
    result = workflow.run("-n", config={"dataset": {"path": str(folder)}, "num_shards": 1})
    assert "Config error" not in result.stderr
    shutil.rmtree(folder)
