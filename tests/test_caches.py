"""Damaged cache files (a disk that filled mid-write, a hand edit, another version's
file): each is ignored with one warning line naming it, and rebuilt; none fails a run.

The status and gather check caches are covered beside their commands
(tests/test_status.py, tests/test_gather_cache.py); the disk ledger in tests/test_locks.py.
"""

import json
import logging

import pytest

from teacher_logits.fingerprints import dataset_digest
from teacher_logits.json_cache import load_cache, save_cache
from teacher_logits.layout import RunLayout
from teacher_logits.run_inputs import load_digest_cache, save_digest_cache

DAMAGES = {
    "a file entry that is a string": lambda data: {str(data): "x"},
    "a list": lambda data: [1, 2],
    "not JSON": lambda data: "{\0",
    "a file entry without its hash": lambda data: {str(data): {"key": "1:2:3:4"}},
    "a row count that is a string": lambda data: {"rows:abc:train": "x"},
    "a growth entry without its answer": lambda data: {f"grown:{data}": {"key": "k"}},
}


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_digest_cache_is_ignored_with_one_warning_and_rebuilt(tmp_path, caplog, damage):
    data = (tmp_path / "data.jsonl").resolve()
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    layout = RunLayout(tmp_path / "out")
    layout.output_dir.mkdir()
    made = DAMAGES[damage](data)
    layout.digest_cache.write_text(made if isinstance(made, str) else json.dumps(made))
    with caplog.at_level(logging.WARNING):
        cache = load_digest_cache(layout)
        # What every plan does first (rules/common.smk): the dataset's content digest.
        assert dataset_digest([data], cache) == dataset_digest([data], {})
    (warning,) = warnings_in(caplog)
    assert str(layout.digest_cache) in warning and "it is rebuilt" in warning
    save_digest_cache(layout, cache, {})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert str(data) in load_digest_cache(layout)
    assert warnings_in(caplog) == []


def test_a_cache_that_cannot_be_written_costs_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert not save_cache(blocker / "cache.json", {"a": 1})  # its folder is a file
    target = tmp_path / "cache.json"
    (tmp_path / "cache.json.partial").mkdir()  # its temp file cannot be made
    assert not save_cache(target, {"a": 1}) and not target.exists()
    assert load_cache(target, lambda data: True) is None


def test_another_versions_check_cache_is_not_called_damaged(tmp_path, caplog):
    """Entries of another version of gather's checks may have another shape: unused, kept
    quiet, and never deleted as damage."""
    from teacher_logits.store.validation_cache import CHECKS_VERSION, ValidationCache

    path = tmp_path / "checks.json"
    path.write_text(json.dumps({"version": CHECKS_VERSION + 1, "shards": {"0": [1, 2]}}))
    with caplog.at_level(logging.WARNING):
        assert ValidationCache(path).entries == {}
    assert "damaged" not in caplog.text and path.exists()
