"""generation.temperatures: a logsumexp(logits / T) per temperature, from the config
check through the top-k head, the resume parts and the shard, to the reader.

The end-to-end check against the teacher's own forward is in tests/test_workflow.py
(test_stored_topk_matches_unbatched_float32_forward runs with temperatures [0.5, 1, 2]).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from test_prepare_and_teacher import _tiny_model

from teacher_logits import LogitStore
from teacher_logits.config import meaning_settings
from teacher_logits.disk import part_bytes_per_token, uncompressed_bytes_per_token
from teacher_logits.errors import ConfigError, ShardError
from teacher_logits.store.format import (
    ABSENT_ROW_FILL,
    dataset_temperature,
    needed_rows,
    read_attrs,
    temperature_dataset,
)
from teacher_logits.store.reader import read_sample
from teacher_logits.store.writer import ShardWriter
from teacher_logits.temperatures import check_temperatures, normalise_temperatures

import test_shard_format
from conftest import REPO, demo_workflow
from test_resume import (
    OUT,
    RESUME,
    assert_same_store,
    committed_parts,
    kill_when,
    store_datasets,
)
from test_shard_format import Data, make_data, validate, write_shard

EXTRA = (0.5, 2.0)
ALL = (0.5, 1.0, 2.0)


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


# --- (a) the config: plan-time errors, normalising, the fingerprint -------------------


@pytest.mark.parametrize(
    "temperatures,message",
    [
        ([0.5, 2.0, 0.5], "generation.temperatures lists 0.5 more than once"),
        # The same wiring as above (check_temperatures' cases are unit tests below).
        pytest.param(
            [1.0, 0.0],
            "generation.temperatures: 0.0 is not a temperature of at least 0.001",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_bad_temperature_list_fails_at_plan_time_in_one_line(workflow, temperatures, message):
    result = workflow.run("-n", config={"generation": {"temperatures": temperatures}}, check=False)
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if "Config error" in line]
    assert message in line and "e.g. temperatures: [0.5, 1.0, 2.0]" in line, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "temperatures,message",
    [
        ([2, 2.0], "lists 2.0 more than once"),
        ([1, 1.0], "lists 1.0 more than once"),
        ([-1.5], "-1.5 is not a temperature of at least 0.001"),
        ([float("inf")], "inf is not a temperature of at least 0.001"),
        ([float("nan")], "nan is not a temperature of at least 0.001"),
        ([1e-40], "1e-40 is not a temperature of at least 0.001"),
    ],
)
def test_check_temperatures_names_the_key_the_value_and_the_fix(temperatures, message):
    config = default_config()
    config["generation"]["temperatures"] = temperatures
    with pytest.raises(ConfigError, match=message):
        check_temperatures(config)


def test_temperatures_are_sorted_floats_each_once_with_1_always():
    assert normalise_temperatures([2, 0.5]) == ALL
    assert normalise_temperatures([]) == normalise_temperatures(None) == (1.0,)
    assert all(type(t) is float for t in normalise_temperatures([2, 1]))
    check_temperatures(default_config())  # the default list passes


def test_the_fingerprint_is_unchanged_by_the_default_and_covers_other_temperatures():
    config = default_config()
    assert config["generation"]["temperatures"] == [1.0]
    default = meaning_settings(config)
    assert "temperatures" not in default["generation"]
    del config["generation"]["temperatures"]  # a config from before the key: the same
    assert meaning_settings(config) == default
    # The checked-in store of format version 2 keeps its settings: see test_format_compat.
    spellings = [[2.0], [1.0, 2.0], [2, 1], [2.0, 1.0]]
    settings = []
    for listed in spellings:
        config["generation"]["temperatures"] = listed
        settings.append(meaning_settings(config))
    assert all(s == settings[0] != default for s in settings)
    assert settings[0]["generation"]["temperatures"] == [1.0, 2.0]


def test_the_dataset_name_rule_round_trips():
    assert temperature_dataset(2) == "logsumexp_t2.0"
    assert temperature_dataset(0.5) == "logsumexp_t0.5"
    for temperature in (0.5, 2.0, 0.1, 1e-05, 1.25):
        assert dataset_temperature(temperature_dataset(temperature)) == temperature
    for other in ("logsumexp", "logsumexp_t", "logsumexp_t2", "logsumexp_tx", "entropy"):
        assert dataset_temperature(other) is None


def test_the_disk_estimate_adds_4_bytes_per_token_per_extra_temperature():
    base = uncompressed_bytes_per_token(64, "float16", True)
    assert uncompressed_bytes_per_token(64, "float16", True, ALL) == base + 8
    assert part_bytes_per_token(64, "float16", True, ALL) == base + 8 - 4


# --- (b) the top-k head against the teacher's own forward -----------------------------


def tiny_model(arch: str):
    """The teacher tests' tiny model, with logits spread (random init gives ~0.1) so
    that the temperatures matter."""
    import torch

    model = _tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)


@pytest.mark.parametrize("arch,with_entropy", [("llama", True), ("llama", False), ("gemma2", True)])
def test_the_head_keeps_logsumexp_of_logits_over_t_as_the_models_forward_gives(arch, with_entropy):
    """Tolerance 1e-5 (absolute and relative): a float32 teacher, and the chunked head's
    logits equal the forward's bit for bit (the head checks it), so the two sides differ
    only in how float32 sums are ordered: max/T + log sum exp((x - max)/T) here, torch's
    own logsumexp of x/T there. That is a few ulps of values below ~50 (~4e-6 apart)."""
    import torch

    from teacher_logits.generation.teacher import TopKHead

    model = tiny_model(arch)
    head = TopKHead(
        model,
        top_k=5,
        chunk_bytes=4 * 300 * 4,
        with_entropy=with_entropy,
        temperatures=TEMPERATURES,
    )
    assert head.chunk_rows == 4 and head.extra_temperatures == (0.25, 0.5, 2.0, 4.0)
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    result = head(ids, mask)
    with torch.no_grad():
        expected = torch.cat(
            [model(ids[b : b + 1, : int(mask[b].sum())]).logits[0].float() for b in range(3)]
        )
    assert expected.max() - expected.min() > 5.0  # a spread that tells temperatures apart
    assert set(result.logsumexp_t) == {0.25, 0.5, 2.0, 4.0}
    for temperature, lse in result.logsumexp_t.items():
        assert lse.dtype == torch.float32 and lse.shape == (int(mask.sum()),)
        torch.testing.assert_close(
            lse, torch.logsumexp(expected / temperature, -1), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(
        result.logsumexp, torch.logsumexp(expected, -1), atol=1e-5, rtol=1e-5
    )


def test_the_long_document_split_path_carries_each_temperature_from_its_window():
    """overflow: split reads a long document in overlapping windows; each row's logsumexp
    at T must come from the same window its top-k came from. Recomputed here window by
    window from the model's own forward (the same 1e-5 as above, same reasons)."""
    import torch

    from teacher_logits.generation.batching import long_document_windows
    from teacher_logits.generation.compute import compute_window_split
    from teacher_logits.generation.teacher import TopKHead

    model = tiny_model("llama")
    head = TopKHead(model, top_k=4, temperatures=ALL)
    rng = np.random.default_rng(0)
    lengths = np.array([7, 40, 12])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids = rng.integers(0, 300, int(offsets[-1])).astype(np.int32)
    rows = compute_window_split(head, input_ids, offsets, 64, 0, max_length=16, stride=4)
    assert set(rows) >= {"logsumexp", "logsumexp_t0.5", "logsumexp_t2.0"}
    assert "logsumexp_t1.0" not in rows
    cut = long_document_windows(lengths, 16, 4)
    for temperature in EXTRA:
        expected = np.full(int(offsets[-1]), np.nan, dtype=np.float32)
        for s, a, b, keep in zip(cut["sample"], cut["start"], cut["stop"], cut["keep_start"]):
            window = torch.from_numpy(input_ids[offsets[s] + a : offsets[s] + b].astype(np.int64))
            with torch.no_grad():
                logits = model(window[None]).logits[0].float()
            lse = torch.logsumexp(logits / temperature, -1).numpy()
            expected[offsets[s] + keep : offsets[s] + b] = lse[keep - a :]
        assert not np.isnan(expected).any()
        np.testing.assert_allclose(
            rows[temperature_dataset(temperature)], expected, atol=1e-5, rtol=1e-5
        )


# --- (c) writer -> validate -> reader, masked-only too; resume parts ------------------


def tempered(data: Data) -> dict:
    """Plausible logsumexps at 0.5 and 2: the top-k's own at T plus some tail mass."""
    logits = data.topk_logits.astype(np.float64)
    tail = np.log1p(np.random.default_rng(7).uniform(0.1, 2.0, len(logits)))
    out = {}
    for temperature in EXTRA:
        scaled = logits / temperature
        top = scaled.max(axis=1)
        lse = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)) + tail
        out[temperature_dataset(temperature)] = lse.astype(np.float32)
    return out


def with_tempered(data: Data):
    """``arrays`` of test_shard_format, each block with its rows of every temperature."""
    original, extra = test_shard_format.arrays, tempered(data)

    def arrays(data, r0, r1):
        return {**original(data, r0, r1), **{n: v[r0:r1] for n, v in extra.items()}}

    return arrays, extra


@pytest.fixture
def tempered_arrays(monkeypatch):
    data = make_data(seed=5, num_samples=6)
    arrays, extra = with_tempered(data)
    monkeypatch.setattr(test_shard_format, "arrays", arrays)
    return data, extra


def test_a_shard_with_temperatures_writes_validates_and_reads_back(tmp_path, tempered_arrays):
    data, extra = tempered_arrays
    path = write_shard(tmp_path / "s.h5", data, temperatures=[2.0, 0.5])
    validate(path, data, temperatures=ALL)
    with h5py.File(path) as f:
        assert json.loads(f.attrs["temperatures"]) == list(ALL)
        assert read_attrs(f)["temperatures"] == list(ALL)
        for temperature in EXTRA:
            ds = f[temperature_dataset(temperature)]
            assert ds.dtype == np.float32 and ds.attrs["temperature"] == temperature
        for position in range(len(data.sample_ids)):
            r0, r1 = int(data.offsets[position]), int(data.offsets[position + 1])
            rec = read_sample(f, position)
            assert list(rec["logsumexp_t"]) == list(ALL)
            assert rec["logsumexp_t"][1.0] is rec["logsumexp"]
            for temperature in EXTRA:
                expected = extra[temperature_dataset(temperature)][r0:r1]
                np.testing.assert_array_equal(rec["logsumexp_t"][temperature], expected)
            assert not any(dataset_temperature(name) for name in rec)  # all in logsumexp_t


def test_a_shard_without_temperatures_has_no_attribute_and_reads_1_only(tmp_path):
    data = make_data()
    path = write_shard(tmp_path / "s.h5", data)
    with h5py.File(path) as f:
        assert "temperatures" not in f.attrs
        rec = read_sample(f, 0)
    assert list(rec["logsumexp_t"]) == [1.0]
    validate(path, data)
    with pytest.raises(ShardError, match=r"temperatures \[1.0\], the run asks for \[0.5, 1.0"):
        validate(path, data, temperatures=ALL)


@pytest.mark.parametrize("masked_only", [False, True])
def test_masked_only_storage_keeps_the_temperatures_rows_too(
    tmp_path, tempered_arrays, masked_only
):
    data, extra = tempered_arrays
    # The one-shard index below lists it first: shard 0, as gather would name it (a reader
    # refuses a shard whose index attribute is not its place in the index).
    data.attrs["shard_index"] = 0
    loss_mask = (np.random.default_rng(1).random(int(data.offsets[-1])) < 0.5).astype(np.uint8)
    keep_all = needed_rows(loss_mask, data.offsets)
    writer = ShardWriter(
        tmp_path / "s.h5",
        len(data.sample_ids),
        int(data.offsets[-1]),
        data.topk_ids.shape[1],
        with_loss_mask=True,
        stored_rows=keep_all if masked_only else None,
        temperatures=ALL,
    )
    rows = test_shard_format.arrays(data, 0, int(data.offsets[-1]))  # with the temperatures
    writer.write_block(data.sample_ids, data.lengths, {**rows, "loss_mask": loss_mask})
    path = writer.commit(data.attrs)
    summary = validate(path, data, loss_mask=loss_mask, masked_only=masked_only, temperatures=ALL)
    with h5py.File(path) as f:
        assert f["logsumexp_t2.0"].shape == (summary.num_rows,)
    index_over(path, data, masked_only)
    with LogitStore(tmp_path) as store:
        assert store.temperatures == list(ALL)
        for i in range(len(store)):
            rec = store[i]
            r0, r1 = int(data.offsets[i]), int(data.offsets[i + 1])
            keep = keep_all[r0:r1] if masked_only else np.ones(r1 - r0, dtype=bool)
            for temperature in EXTRA:
                got = rec["logsumexp_t"][temperature]
                want = extra[temperature_dataset(temperature)][r0:r1]
                assert got.dtype == np.float32 and got.shape == (r1 - r0,)
                np.testing.assert_array_equal(got[keep], want[keep])
                assert (got[~keep] == ABSENT_ROW_FILL).all()


def index_over(shard: Path, data: Data, masked_only: bool) -> None:
    """A one-shard ``index.h5`` beside ``shard``, as gather writes it."""
    from teacher_logits.gather import write_index
    from teacher_logits.layout import RunLayout

    with h5py.File(shard) as f:
        attrs = read_attrs(f)
    lengths = np.diff(data.offsets)
    index = RunLayout(shard.parent).index
    write_index(
        index,
        index,
        {
            "format_version": attrs["format_version"],
            "top_k": attrs["top_k"],
            "num_tokens": int(lengths.sum()),
            "config_fingerprint": attrs["config_fingerprint"],
            "has_loss_mask": True,
            "masked_only": masked_only,
            "temperatures": json.dumps(list(ALL)),
        },
        [shard.name],
        {
            "sample_ids": data.sample_ids,
            "sample_shard": np.zeros(len(lengths), dtype=np.int32),
            "sample_position": np.arange(len(lengths), dtype=np.int64),
            "sample_length": lengths,
        },
    )


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: f["logsumexp_t0.5"].__setitem__(slice(0, 1), -1e4), "smaller than the top"),
        (lambda f: f["logsumexp_t2.0"].__setitem__(slice(2, 3), np.nan), "non-finite values in"),
        (lambda f: f["logsumexp_t2.0"].attrs.__setitem__("temperature", 3.0), "attribute 3.0"),
        (lambda f: f.attrs.__setitem__("temperatures", "[1.0, 2.0]"), "asks for [0.5, 1.0, 2.0]"),
        (lambda f: f.__delitem__("logsumexp_t0.5"), "'logsumexp_t0.5' is missing"),
        (lambda f: f.create_dataset("logsumexp_t3.0", data=np.zeros(3)), "not among its"),
    ],
)
def test_validation_checks_every_temperature(tmp_path, tempered_arrays, damage, message):
    data, _ = tempered_arrays
    path = write_shard(tmp_path / "s.h5", data, temperatures=ALL)
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(ShardError, match=message.replace("[", r"\[")):
        validate(path, data, temperatures=ALL)


def test_the_writer_refuses_rows_without_a_temperature(tmp_path):
    data = make_data()
    with pytest.raises(ShardError, match="rows without 'logsumexp_t0.5'"):
        write_shard(tmp_path / "s.h5", data, temperatures=ALL)


def part_rows(rows: int, temperatures) -> dict:
    out = {
        "topk_ids": np.arange(rows * 4, dtype=np.int32).reshape(rows, 4),
        "topk_logits": np.ones((rows, 4), np.float32),
        "logsumexp": np.full(rows, 3.0, np.float32),
        "entropy": np.zeros(rows, np.float32),
    }
    for temperature in temperatures:
        if temperature != 1.0:
            out[temperature_dataset(temperature)] = np.full(rows, 3.0 / temperature, np.float32)
    return out


def test_resume_parts_carry_the_temperatures_and_are_dropped_when_they_change(tmp_path, caplog):
    from teacher_logits.generation.parts import (
        CommittedParts,
        PartWriter,
        iter_part_rows,
        read_part_attrs,
    )

    identity = {"config_fingerprint": "c", "temperatures": list(ALL)}
    parts = CommittedParts(tmp_path / "p", identity, rows_total=20)
    writer = PartWriter(parts.part_path(0), 0, 0)
    writer.append(2, part_rows(10, ALL))
    path = writer.commit({"committed_at": 1.0})
    parts.add(path, read_part_attrs(path))
    ((r0, rows),) = list(iter_part_rows(path))
    np.testing.assert_array_equal(rows["logsumexp_t0.5"], np.full(10, 6.0, np.float32))
    assert set(rows) == set(part_rows(1, ALL))

    assert CommittedParts(tmp_path / "p", identity, rows_total=20).rows_done == 10
    with caplog.at_level(logging.WARNING):
        other = CommittedParts(tmp_path / "p", {**identity, "temperatures": [1.0]}, 20)
    assert other.rows_done == 0
    assert "discarding 1 committed part(s)" in caplog.text
    assert "generation.temperatures changed" in caplog.text


def test_parts_from_before_temperatures_are_kept_by_a_run_at_temperature_1(tmp_path, caplog):
    from teacher_logits.generation.parts import CommittedParts, PartWriter, read_part_attrs

    older = {"config_fingerprint": "c"}  # a meta file written before the key existed
    parts = CommittedParts(tmp_path / "p", older, rows_total=20)
    writer = PartWriter(parts.part_path(0), 0, 0)
    writer.append(2, part_rows(10, (1.0,)))
    parts.add(writer.commit({"committed_at": 1.0}), read_part_attrs(parts.part_path(0)))
    with caplog.at_level(logging.WARNING):
        kept = CommittedParts(tmp_path / "p", {**older, "temperatures": [1.0]}, 20)
    assert kept.rows_done == 10 and "discarding" not in caplog.text


# --- gather: the index records the temperatures; shards that disagree are refused -----

STORE_V2 = Path(__file__).parent / "data" / "store_v2"


def rewrite_with_temperatures(layout, shard: int, records: dict) -> None:
    """Shard ``shard`` of the checked-in store written again with temperatures 0.5 and 2,
    from its ``records`` (by sample id) as the reader returned them."""
    from teacher_logits.store.prepared import read_prepared
    from teacher_logits.store.writer import ShardWriter

    sample_ids, offsets, _ = read_prepared(layout.tokens).shard_slice(shard)
    records = [records[int(s)] for s in sample_ids]
    with h5py.File(layout.shard(shard)) as handle:
        attrs = {
            k: v for k, v in read_attrs(handle).items() if k not in ("format_version", "top_k")
        }
    names = ("topk_ids", "topk_logits", "logsumexp", "entropy", "input_ids")
    rows = {name: np.concatenate([r[name] for r in records]) for name in names}
    for temperature in EXTRA:  # at least the top logit / T: what validation asks
        top = rows["topk_logits"].astype(np.float32).max(axis=1)
        rows[temperature_dataset(temperature)] = (top / temperature + 0.5).astype(np.float32)
    writer = ShardWriter(layout.shard(shard), len(sample_ids), int(offsets[-1]), top_k=8,
                         temperatures=ALL)  # fmt: skip
    writer.write_block(sample_ids, np.diff(offsets), rows)
    writer.commit(attrs)


def test_gather_records_the_temperatures_and_refuses_shards_that_disagree(tmp_path):
    from teacher_logits.gather import gather
    from teacher_logits.layout import RunLayout
    from teacher_logits.verify import verify

    shutil.copytree(STORE_V2, tmp_path / "store")
    layout = RunLayout(tmp_path / "store")
    with LogitStore(layout.output_dir) as reader:
        records = {int(sid): reader.by_sample_id(sid) for sid in reader.sample_ids}
    rewrite_with_temperatures(layout, 1, records)
    for path in (layout.index, layout.manifest):
        path.unlink()
    with pytest.raises(ShardError) as refused:  # the plan asks for temperature 1 only
        gather(layout, workers=1)
    assert "shard 1 (" in str(refused.value)
    assert "logsumexp at temperatures [0.5, 1.0, 2.0], the run asks for [1.0]" in str(refused.value)

    # Made by a run with other temperatures, a shard's fingerprint differs too: both said.
    with h5py.File(layout.shard(1), "r+") as f:
        ours, f.attrs["config_fingerprint"] = f.attrs["config_fingerprint"], "f" * 32
    with pytest.raises(ShardError) as refused:
        gather(layout, workers=1)
    assert "shard 1 has ffffffffffff...: they were made with different settings" in str(
        refused.value
    )
    assert "expected [1.0] (generation.temperatures differs)" in str(refused.value)
    with h5py.File(layout.shard(1), "r+") as f:
        f.attrs["config_fingerprint"] = ours

    # The same shards under a plan with those temperatures: shard 0 is the one refused.
    plan = json.loads(layout.plan.read_text())
    plan["settings"]["generation"]["temperatures"] = list(ALL)
    layout.plan.write_text(json.dumps(plan))
    with pytest.raises(ShardError, match=r"shard 0 \(.*the run asks for \[0.5, 1.0, 2.0\]"):
        gather(layout, workers=1)

    rewrite_with_temperatures(layout, 0, records)
    gather(layout, workers=1)
    with h5py.File(layout.index) as index:
        assert json.loads(index.attrs["temperatures"]) == list(ALL)
    assert json.loads(layout.manifest.read_text())["temperatures"] == list(ALL)
    with LogitStore(layout.output_dir) as store:
        assert store.temperatures == list(ALL)
        rec = store[0]
        top = rec["topk_logits"].astype(np.float32).max(axis=1)
        np.testing.assert_allclose(rec["logsumexp_t"][2.0], top / 2.0 + 0.5, rtol=1e-6)
    assert verify(layout.output_dir, deep=True, workers=1) == []


# --- end to end (slow): kills and resumes with temperatures ---------------------------

TEMPERED_RESUME = {
    **RESUME,
    "generation": {**RESUME["generation"], "temperatures": [0.5, 1.0, 2.0]},
}


@pytest.mark.slow
def test_parts_of_other_temperatures_are_discarded_and_a_killed_run_resumes_bit_identical(
    workflow, demo_dir, tmp_path
):
    uninterrupted = demo_workflow(tmp_path / "reference", demo_dir)
    uninterrupted.run("--cores", "1", config=TEMPERED_RESUME)
    expected = store_datasets(uninterrupted.root)
    assert {"shard_00000.h5:logsumexp_t0.5", "shard_00001.h5:logsumexp_t2.0"} <= set(expected)
    args = ("--cores", "1")

    # Parts committed at temperature 1 only: a run with temperatures starts the shard anew.
    proc = workflow.start(*args, config=RESUME)
    kill_when(proc, lambda: len(committed_parts(workflow)) >= 1, "a part committed")
    proc = workflow.start(*args, config=TEMPERED_RESUME)
    log0 = workflow.path(OUT, "logs", "generate", "shard_00000.log")

    def started_anew_and_two_parts_in():
        said = log0.read_text() if log0.exists() else ""
        return "generation.temperatures changed" in said and len(committed_parts(workflow)) >= 2

    kill_when(proc, started_anew_and_two_parts_in, "old parts discarded, two new committed")
    assert "discarding" in log0.read_text() and "resuming" not in log0.read_text()

    # Killed mid-shard, the same command resumes from parts that carry every temperature.
    workflow.run(*args, config=TEMPERED_RESUME)
    assert "resuming shard_00000.parts" in log0.read_text()
    assert_same_store(store_datasets(workflow.root), expected)
