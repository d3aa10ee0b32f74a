"""check_tokenizer and the tokenizer identity it rests on: an unchanged tokenizer saved
again passes whatever bytes its files get, and so do a student with pad = eos or with
a token added past the teacher's vocabulary (the store's ids mean the same to it); a
swapped id, a missing token, another BOS behaviour, a lost special role or a wholly
different tokenizer fails naming it; gather's copy of the teacher's tokenizer replaces
the old one whole."""

import json
import shutil
from pathlib import Path

import pytest

from teacher_logits.errors import TokenizerMismatch, TrainingInputError
from teacher_logits.layout import RunLayout
from teacher_logits.tokenizer_identity import (
    copy_tokenizer_files,
    first_difference,
    tokenizer_content_fingerprint,
    tokenizer_summary,
)
from teacher_logits.training import check_tokenizer

from conftest import REPO

pytest.importorskip("transformers")


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def teacher_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of 300 tokens that puts <s> in front of every text,
    like the demo teacher's (trained on a few hundred short strings: fast)."""
    from teacher_logits.demo import build_tokenizer

    words = ("apple", "river", "stone", "cloud")
    texts = [f"the {w} number {i} is {i * 7} and {w[::-1]}" for i in range(100) for w in words]
    path = tmp_path_factory.mktemp("teacher") / "tokenizer"
    build_tokenizer(texts, vocab_size=300).save_pretrained(path)
    return path


@pytest.fixture
def store(tmp_path, teacher_tokenizer_dir) -> Path:
    """A store directory holding what gather copies: the teacher's tokenizer."""
    root = tmp_path / "store"
    copy_tokenizer_files(teacher_tokenizer_dir, RunLayout(root).tokenizer_dir)
    return root


def edited(source: Path, dest: Path, edit_tokenizer=None, edit_config=None) -> Path:
    """A copy of tokenizer directory ``source`` with its JSON files changed."""
    shutil.copytree(source, dest)
    for name, edit in (("tokenizer.json", edit_tokenizer), ("tokenizer_config.json", edit_config)):
        if edit:
            data = json.loads((dest / name).read_text())
            edit(data)
            (dest / name).write_text(json.dumps(data))
    return dest


def mismatch(store, student) -> str:
    with pytest.raises(TokenizerMismatch) as error:
        check_tokenizer(store, student)
    message = str(error.value)
    assert "\n" not in message and "must mean the same token to the student" in message
    assert message.endswith(
        "a student with another tokenizer distils through teacher_logits.training.cross_tokenizer"
    )
    return message


def test_the_same_tokenizer_saved_again_passes_and_keeps_its_fingerprint(
    tmp_path, store, teacher_tokenizer_dir
):
    once = tmp_path / "once"
    load(teacher_tokenizer_dir).save_pretrained(once)
    twice = tmp_path / "twice"
    load(once).save_pretrained(twice)
    # The same content in other bytes: keys sorted, indented.
    reformatted = edited(twice, tmp_path / "reformatted")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((reformatted / name).read_text())
        (reformatted / name).write_text(json.dumps(data, sort_keys=True, indent=1))
    files = lambda p: {f.name: f.read_bytes() for f in p.iterdir()}  # noqa: E731
    assert files(reformatted) != files(teacher_tokenizer_dir)

    fingerprint = tokenizer_content_fingerprint(load(teacher_tokenizer_dir))
    for path in (once, twice, reformatted):
        assert tokenizer_content_fingerprint(load(path)) == fingerprint
        assert check_tokenizer(store, path) is None  # a path to load
        assert check_tokenizer(store, load(path)) is None  # a tokenizer object
    assert check_tokenizer(RunLayout(store).index, load(once)) is None  # the index path
    summary = tokenizer_summary(load(once))
    assert summary["prepended_ids"] == [summary["vocab"]["<s>"]] and summary["appended_ids"] == []


def test_two_swapped_ids_fail_naming_the_first_token(tmp_path, store, teacher_tokenizer_dir):
    vocab = json.loads((teacher_tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    low, high = by_id[150], by_id[200]

    def swap(data):
        data["model"]["vocab"][low], data["model"]["vocab"][high] = 200, 150

    student = edited(teacher_tokenizer_dir, tmp_path / "swapped", edit_tokenizer=swap)
    message = mismatch(store, student)
    assert message.startswith(
        f"id 150 is {low!r} in the teacher's tokenizer but {high!r} in the student's "
        f"(which gives {low!r} id 200)"
    )
    assert tokenizer_content_fingerprint(load(student)) != tokenizer_content_fingerprint(
        load(teacher_tokenizer_dir)
    )


def test_fewer_tokens_fail_naming_the_missing_id(tmp_path, store, teacher_tokenizer_dir):
    def drop_last(data):
        model = data["model"]
        last = max(model["vocab"], key=model["vocab"].get)
        del model["vocab"][last]
        # The last merge made the last token; without it the merge names nothing.
        model["merges"] = [m for m in model["merges"] if "".join(m) != last]

    student = edited(teacher_tokenizer_dir, tmp_path / "fewer", edit_tokenizer=drop_last)
    message = mismatch(store, student)
    assert message.startswith("id 299 is ") and "in the student's" in message
    assert "in the teacher's tokenizer but no token in the student's" in message


def test_another_bos_behaviour_fails(tmp_path, store, teacher_tokenizer_dir):
    def no_bos(data):
        data["post_processor"] = None

    student = edited(teacher_tokenizer_dir, tmp_path / "no_bos", edit_tokenizer=no_bos)
    message = mismatch(store, student)
    assert message.startswith(
        "the teacher's tokenizer adds '<s>' (id 1) in front of every text (BOS) "
        "but the student's adds nothing"
    )


def test_pad_set_to_eos_passes(tmp_path, store, teacher_tokenizer_dir):
    """Common Hugging Face practice; no id the store holds changes meaning."""

    def pad_is_eos(config):
        config["pad_token"] = "</s>"

    student = edited(teacher_tokenizer_dir, tmp_path / "pad_eos", edit_config=pad_is_eos)
    assert load(student).pad_token == "</s>"
    assert check_tokenizer(store, student) is None


def test_tokens_added_past_the_teacher_vocabulary_pass(tmp_path, store, teacher_tokenizer_dir):
    student = load(teacher_tokenizer_dir)
    student.add_special_tokens({"pad_token": "<|pad|>"})  # a new special token as pad
    student.add_tokens(["<|tool|>"])
    assert len(student) == 302 and student.convert_tokens_to_ids("<|tool|>") == 301
    student.save_pretrained(tmp_path / "added")
    assert check_tokenizer(store, student) is None
    assert check_tokenizer(store, tmp_path / "added") is None


def test_a_teacher_special_token_made_plain_fails(tmp_path, store, teacher_tokenizer_dir):
    def eos_plain(config):
        config["eos_token"] = None

    student = edited(teacher_tokenizer_dir, tmp_path / "no_eos", edit_config=eos_plain)
    message = mismatch(store, student)
    assert message.startswith(
        "the eos token is '</s>' (id 2) in the teacher's tokenizer but not set in the student's"
    )


def test_a_different_tokenizer_fails_pointing_to_cross_tokenizer_distillation(
    tmp_path, store, teacher_tokenizer_dir
):
    from teacher_logits.demo import build_tokenizer

    texts = [f"une pierre {i} et un nuage {i * 3}" for i in range(200)]
    build_tokenizer(texts, vocab_size=300).save_pretrained(tmp_path / "other")
    message = mismatch(store, tmp_path / "other")
    assert message.startswith("id ") and "in the teacher's tokenizer but" in message


def test_first_difference_of_equal_summaries_is_none(teacher_tokenizer_dir):
    summary = tokenizer_summary(load(teacher_tokenizer_dir))
    assert first_difference(summary, json.loads(json.dumps(summary))) is None


def test_a_store_gathered_without_a_tokenizer_says_to_gather_again(tmp_path, teacher_tokenizer_dir):
    (tmp_path / "old_store").mkdir()
    with pytest.raises(TrainingInputError) as error:
        check_tokenizer(tmp_path / "old_store", teacher_tokenizer_dir)
    message = str(error.value)
    assert "\n" not in message and "older version" in message
    assert "--forcerun gather" in message


def test_the_gather_rule_is_named_as_the_error_says():
    assert "rule gather:" in (REPO / "rules" / "gather.smk").read_text()


def test_copying_tokenizer_files_replaces_the_old_copy_whole(tmp_path, teacher_tokenizer_dir):
    model = tmp_path / "model"
    shutil.copytree(teacher_tokenizer_dir, model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    dest = tmp_path / "store" / "tokenizer"
    dest.mkdir(parents=True)
    (dest / "vocab.json").write_text("stale")  # from an older teacher: must not survive
    # Left by an interrupted copy: cleared, not mixed in.
    (tmp_path / "store" / "tokenizer.partial").mkdir()
    (tmp_path / "store" / "tokenizer.partial" / "merges.txt").write_text("half")

    copied = copy_tokenizer_files(model, dest)
    assert sorted(copied) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(copied)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tokenizer"]
    assert (dest / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert tokenizer_content_fingerprint(load(dest)) == tokenizer_content_fingerprint(load(model))


def test_a_model_directory_without_tokenizer_files_is_a_one_line_error(tmp_path):
    from teacher_logits.errors import TeacherError

    (tmp_path / "model").mkdir()
    with pytest.raises(TeacherError, match="no tokenizer files") as error:
        copy_tokenizer_files(tmp_path / "model", tmp_path / "store" / "tokenizer")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "store").exists()
