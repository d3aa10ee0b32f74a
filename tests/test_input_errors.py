"""Input that cannot be used as it is: one line naming the file, the line and the fix.

Bad dataset files (bytes that are not UTF-8, a file cut off mid-line), a config file
that does not parse, and texts that literally hold special-token strings ("</s>"),
which the tokenizer would silently turn into control tokens.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import teacher_logits.prepare as prepare_module
import teacher_logits.tokenization as tokenization
from teacher_logits.config import (
    check_chat_and_overflow,
    check_config_file,
    meaning_settings,
)
from teacher_logits.errors import ConfigError, DataError
from teacher_logits.layout import RunLayout
from teacher_logits.settings import PrepareSettings
from teacher_logits.tokenization import Tokenization, load_column

from conftest import REPO, Workflow

ROWS = [{"text": f"an ordinary row of text number {i}"} for i in range(5)]
GOOD = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
ICONV = "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8"


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def base_config(dataset: Path, demo_dir: Path, **dataset_keys) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["dataset"].update(path=str(dataset), **dataset_keys)
    config["teacher"]["path"] = str(demo_dir / "teacher")
    config["num_shards"] = 1
    config["gpu_assignment"] = "local"  # as the Snakefile resolves it for a local run
    return config


def run_prepare(config: dict, out: Path, threads: int = 1) -> dict:
    layout = RunLayout(out)
    layout.prepared_dir.mkdir(parents=True)
    prepare_module.prepare(PrepareSettings.from_config(config, threads), layout)
    with h5py.File(layout.tokens) as f:
        arrays = {name: f[name][:] for name in f}
    return {"arrays": arrays, "plan": json.loads(layout.plan.read_text())}


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# --- dataset files ----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_that_is_not_utf8_names_file_line_byte_and_fix(
    demo_dir, tmp_path, monkeypatch, threads
):
    # A blank line before it: line 8 of the file is row 6 of the dataset.
    data = write(tmp_path / "data.jsonl", GOOD + b"\n" + b'{"text": "caf\xe9 au lait"}\n' + GOOD)
    # Small batches and a low per-process floor: with threads=2 two processes tokenize.
    monkeypatch.setattr(tokenization, "READ_BATCH_ROWS", 4)
    monkeypatch.setattr(prepare_module, "ROWS_PER_PROCESS", 3)
    with pytest.raises(DataError) as exc_info:
        run_prepare(base_config(data, demo_dir), tmp_path / "out", threads)
    message = one_line(exc_info)
    assert f"could not read {data}: line 7 (dataset row 5), byte 14 is not valid UTF-8" in message
    assert "0xe9" in message and ICONV in message
    assert list((tmp_path / "out" / "prepared").iterdir()) == []  # no half-written tokens file


def test_a_chat_row_that_is_not_utf8_names_its_line(demo_dir, tmp_path):
    row = b'{"messages": [{"role": "user", "content": "gr\xfc\xdf dich"}]}\n'
    good = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode() + b"\n"
    data = write(tmp_path / "chat.jsonl", good * 3 + row)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    config = base_config(data, demo_dir, messages_field="messages", chat_template=str(template))
    with pytest.raises(DataError) as exc_info:
        run_prepare(config, tmp_path / "out")
    assert "line 4 (dataset row 3), byte 46 is not valid UTF-8" in one_line(exc_info)


def test_a_file_cut_off_mid_line_says_so(tmp_path):
    for ending in (b"", b"\n"):  # with or without a last newline
        data = write(
            tmp_path / "cut.jsonl", GOOD + b'{"text": "the copy stopped in the mid' + ending
        )
        with pytest.raises(DataError) as exc_info:
            load_column(data, "train", "text", None)
        assert one_line(exc_info) == (
            f"dataset.path: could not read {data}: its last line (6) stops in the middle of a "
            "JSON object, so the file is cut off; copy it again, or remove the last line"
        )


def test_a_broken_line_in_the_middle_names_line_and_column(tmp_path):
    data = write(tmp_path / "data.jsonl", GOOD + b'{"text": "x",}\n' + GOOD)
    with pytest.raises(DataError) as exc_info:
        load_column(data, "train", "text", None)
    message = one_line(exc_info)
    assert f"could not read {data}: line 6, column 14 is not valid JSON" in message
    assert "fix or remove that line" in message and "cut off" not in message
    lines = write(tmp_path / "list.jsonl", GOOD + b"[1, 2]\n")
    with pytest.raises(DataError, match=r"line 6 holds a JSON list, not an object"):
        load_column(lines, "train", "text", None)


def test_json_files_are_located_too(tmp_path):
    # One JSON document (a list of rows) with a Latin-1 byte on its second line.
    document = write(tmp_path / "doc.json", b'[{"text": "a"},\n {"text": "caf\xe9"}]\n')
    with pytest.raises(DataError) as exc_info:
        load_column(document, "train", "text", None)
    assert "line 2, byte 15 is not valid UTF-8" in one_line(exc_info)
    assert ICONV in str(exc_info.value)
    cut_document = write(tmp_path / "cut.json", b'[{"text": "a"},\n {"text": "ca')
    with pytest.raises(DataError, match=r"middle of its JSON document \(at line 2\).*cut off"):
        load_column(cut_document, "train", "text", None)
    # Line-delimited .json: located line by line like .jsonl.
    lines = write(tmp_path / "lines.json", b'{"text": "a"}\n{"text": "b"}\n{"text": "c')
    with pytest.raises(DataError, match=r"its last line \(3\) stops in the middle"):
        load_column(lines, "train", "text", None)


def test_a_byte_order_mark_is_no_error_and_counts_in_the_byte_position(tmp_path):
    bom = b"\xef\xbb\xbf"
    assert load_column(write(tmp_path / "bom.jsonl", bom + GOOD), "train", "text", None)[
        "text"
    ] == [row["text"] for row in ROWS]
    data = write(tmp_path / "bad.jsonl", bom + b'{"text": "\xe9t\xe9"}\n' + GOOD)
    loaded = load_column(data, "train", "text", None)  # pyarrow keeps the bytes as they are
    with pytest.raises(DataError, match=r"line 1 \(dataset row 0\), byte 14 is not valid UTF-8"):
        next(tokenization.tokenize_rows(loaded, "text", None, 1, data))


# --- config files -----------------------------------------------------------------------


def test_a_config_file_that_does_not_parse_names_line_and_fix(tmp_path):
    cases = {
        "num_shards: 2\ndataset:\n\tpath: demo\n": (
            "line 3, column 1: found character '\\t' that cannot start any token; "
            "indent with spaces, not tabs"
        ),
        "dataset:\n  path: demo\n text_field: x\n": (
            "line 3, column 2: expected <block end>, but found '<block mapping start>'; indent "
            "the keys of one section by the same number of spaces"
        ),
        "output_dir: a: b\n": "line 1, column 14: mapping values are not allowed here",
        "- num_shards\n": "holds a list, not keys; write it as 'key: value' lines",
        "": "holds nothing, not keys",
    }
    for text, expected in cases.items():
        path = tmp_path / "my.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as exc_info:
            check_config_file(path)
        assert f"config file {path}" in one_line(exc_info) and expected in str(exc_info.value)
    path.write_text("num_shards: 2\ndataset:\n  path: demo\n")
    assert check_config_file(path) == path
    assert check_config_file(tmp_path / "absent.yaml") == tmp_path / "absent.yaml"


def test_the_workflows_own_config_file_with_a_tab_is_one_line(tmp_path):
    wf = Workflow(tmp_path / "wf", tmp_path / "locks")
    config = wf.path("config", "config.yaml")
    config.write_text(config.read_text().replace("\n  split: train", "\n\tsplit: train"))
    line = config.read_text().splitlines().index("\tsplit: train") + 1
    result = wf.run("-n", check=False)
    assert result.returncode != 0
    assert (
        f"Config error: config file config/config.yaml, line {line}, column 1: found character "
        "'\\t' that cannot start any token; indent with spaces, not tabs"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_configfile_with_a_tab_is_refused_by_snakemake_before_the_workflow_runs(tmp_path):
    """Snakemake parses --configfile files in its command line, before the Snakefile runs,
    and its message names neither file nor line (Snakemake 9.27). This pins that, and the
    command the README gives for the line: if Snakemake starts naming them, say so there."""
    wf = Workflow(tmp_path / "wf", tmp_path / "locks")
    mine = tmp_path / "my.yaml"
    mine.write_text("num_shards: 2\ndataset:\n\tpath: demo\n")
    result = wf.run("-n", "--configfile", str(mine), check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr  # Snakemake prints this error on stdout
    assert "Config file is not valid JSON or YAML" in output and "tab indentation" in output
    assert "line 3" not in output and str(mine) not in output
    assert "Config error" not in output  # the workflow never ran
    check = subprocess.run(
        [sys.executable, "-m", "teacher_logits.config", str(mine)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1
    assert check.stderr.strip() == (
        f"Config error: config file {mine}, line 3, column 1: found character '\\t' that cannot "
        "start any token; indent with spaces, not tabs"
    )


# --- special-token strings in plain text ------------------------------------------------

TEXTS = [
    "nothing special here",
    "the story ends </s> and goes on",
    "<pad><pad>",
    "<|endoftext|> is no special token of this tokenizer",
    "plain again",
]


def test_special_token_strings_are_counted_with_the_tokenizers_added_specials(demo_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    counts = Tokenization(tokenizer, 64, "truncate").batch(10, TEXTS)["special_token_strings"]
    assert counts == {
        "samples": 2,
        "occurrences": 3,
        "tokens": {"</s>": 1, "<pad>": 2},
        "examples": [11, 12],
    }
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    counts = Tokenization(tokenizer, 64, "truncate").batch(0, TEXTS)["special_token_strings"]
    assert counts["samples"] == 3 and counts["tokens"]["<|endoftext|>"] == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_special_token_strings_warn_and_are_recorded_in_the_plan(
    demo_dir, tmp_path, monkeypatch, caplog, threads
):
    texts = TEXTS * 4  # rows 1, 2, 6, 7, 11, ... hold special-token strings
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setattr(tokenization, "READ_BATCH_ROWS", 3)
    monkeypatch.setattr(prepare_module, "ROWS_PER_PROCESS", 5)
    with caplog.at_level(logging.INFO):
        default = run_prepare(base_config(data, demo_dir), tmp_path / "default", threads)
    assert default["plan"]["special_token_strings"] == {
        "samples": 8,
        "occurrences": 12,
        "split": False,
        "tokens": {"<pad>": 8, "</s>": 4},
        "examples": [1, 2, 6, 7, 11],
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "8 samples (rows 1, 2, 6, 7, 11, ...) hold 12 literal special-token strings" in w
        and "set tokenize.split_special_tokens: true to tokenize them as text" in w
        for w in warnings
    ), warnings
    config = base_config(data, demo_dir)
    config["tokenize"]["split_special_tokens"] = True
    split = run_prepare(config, tmp_path / "split", threads)
    assert split["plan"]["special_token_strings"]["split"] is True
    assert split["plan"]["special_token_strings"]["samples"] == 8
    # Default: "</s>" became the eos token; split: only the BOS the tokenizer adds is special.
    specials = [0, 1, 2, 3]  # <pad> <s> </s> <unk>
    for run, expected in ((default, 4 + 8), (split, 0)):
        ids, offsets = run["arrays"]["input_ids"], run["arrays"]["offsets"]
        after_bos = np.delete(ids, offsets[:-1])
        assert int(np.isin(after_bos, specials).sum()) == expected
    assert split["arrays"]["input_ids"].size > default["arrays"]["input_ids"].size
    # It changes the numbers: a new fingerprint only when true, so old stores keep theirs.
    assert split["plan"]["config_fingerprint"] != default["plan"]["config_fingerprint"]
    assert "split_special_tokens" not in default["plan"]["settings"]["tokenize"]
    assert split["plan"]["settings"]["tokenize"]["split_special_tokens"] is True
    assert meaning_settings(base_config(data, demo_dir)) == default["plan"]["settings"]


def test_chat_data_counts_contents_and_refuses_split_special_tokens(demo_dir, tmp_path, caplog):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}" + (" </s>" if i % 2 else "")},
                {"role": "assistant", "content": "an answer"},
            ]
        }
        for i in range(4)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "t.jinja"
    # The template's own eos_token is not counted: only the message contents are.
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}"
                        "{% endfor %}")  # fmt: skip
    config = base_config(data, demo_dir, messages_field="messages", chat_template=str(template))
    with caplog.at_level(logging.WARNING):
        plan = run_prepare(config, tmp_path / "out")["plan"]
    assert plan["special_token_strings"]["samples"] == 2
    assert plan["special_token_strings"]["occurrences"] == 2
    assert any("in their message contents" in r.getMessage() for r in caplog.records)
    config["tokenize"]["split_special_tokens"] = True
    with pytest.raises(ConfigError) as exc_info:
        check_chat_and_overflow(config)
    assert "tokenize.split_special_tokens is for plain text only" in one_line(exc_info)
    with pytest.raises(ConfigError, match="for plain text only"):
        run_prepare(config, tmp_path / "refused")


# --- end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_workflow_reports_a_bad_row_and_records_special_token_strings(workflow, tmp_path):
    bad = write(tmp_path / "latin1.jsonl", GOOD + b'{"text": "caf\xe9"}\n')
    result = workflow.run("--cores", "2", config={"dataset": {"path": str(bad)}}, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "[prepare] ERROR: " in line]
    assert lines and "line 6 (dataset row 5), byte 14 is not valid UTF-8" in lines[0], lines
    assert ICONV in lines[0] and "Traceback" not in result.stderr
    assert not workflow.path("results/demo/shards").exists()

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    result = workflow.run("--cores", "2", config={"dataset": {"path": str(data)}, "num_shards": 1})
    assert "set tokenize.split_special_tokens: true" in result.stderr
    assert workflow.manifest()["special_token_strings"] == {
        "samples": 2,
        "occurrences": 3,
        "split": False,
        "tokens": {"<pad>": 2, "</s>": 1},
        "examples": [1, 2],
    }
