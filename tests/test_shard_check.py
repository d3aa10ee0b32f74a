"""teacher_logits.store.isolated: a crash or a hang while checking a shard names that shard."""

from __future__ import annotations

import json
import os
import signal

import pytest

from teacher_logits.store.isolated import check_isolated, crash_message

from test_shard_format import make_data, validate, write_shard


def _by_item(results):
    return {r.item: r for r in results}


def test_crash_of_one_check_is_reported_and_the_rest_go_on():
    def check(item, progress):
        progress()
        if item == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if item == "abort":
            os.abort()
        if item == "bad":
            from teacher_logits.errors import ShardError

            raise ShardError("dataset 'x' is missing\nsecond line")
        if item == "boom":
            raise RuntimeError("unexpected")
        return item * 2

    items = ["a", "segv", "b", "abort", "bad", "boom", "c"]
    results = _by_item(check_isolated(check, items, workers=2))
    assert set(results) == set(items)
    assert results["a"].value == "aa" and results["c"].value == "cc" and results["b"].error is None
    assert "crashed" in results["segv"].error and "SIGSEGV" in results["segv"].error
    assert "SIGABRT" in results["abort"].error
    # Every error is one line, whatever the exception held.
    assert results["bad"].error == "dataset 'x' is missing second line"
    assert results["boom"].error == "unreadable (RuntimeError: unexpected)"


def test_crash_message_names_the_signal():
    assert "SIGSEGV" in crash_message(-signal.SIGSEGV)
    assert "status 3" in crash_message(3)


def test_a_hang_in_libhdf5_is_stopped_and_named(tmp_path):
    # A flipped byte in the size of the global-heap object that holds the `claims`
    # attribute makes libhdf5 spin forever reading it (found by scanning).
    data = make_data(0, num_samples=40)
    path = write_shard(tmp_path / "shard_00003.h5", data)
    raw = bytearray(path.read_bytes())
    position = bytes(raw).find(json.dumps(data.attrs["claims"]).encode())
    assert position > 8
    raw[position - 8] ^= 0xFF
    path.write_bytes(bytes(raw))

    def check(item, progress):
        return validate(path, data, progress=progress)

    (result,) = check_isolated(check, [path], workers=1, stall_s=2)
    assert "no progress for 2 s" in result.error


def test_a_healthy_shard_reports_progress_and_passes(tmp_path):
    data = make_data(1, num_samples=30)
    path = write_shard(tmp_path / "shard_00003.h5", data)
    calls = []

    summary = validate(path, data, progress=lambda: calls.append(1))
    assert len(calls) >= 3  # open, attributes, each block of rows, done

    def check(item, progress):
        return validate(path, data, progress=progress).num_tokens

    (result,) = check_isolated(check, [path], workers=1, stall_s=600)
    assert result.error is None and result.value == summary.num_tokens


@pytest.mark.parametrize("workers", [1, 3])
def test_every_item_once_in_any_worker_count(workers):
    def check(item, progress):
        return item

    results = list(check_isolated(check, range(10), workers=workers))
    assert sorted(r.value for r in results) == list(range(10))
