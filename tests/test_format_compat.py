"""Format compatibility, pinned by a small store checked in at format version 2.

Readers and gather accept every shard format from version 2 on, and a store may
mix versions; a new optional dataset does not bump the version; a new setting
that changes the stored numbers enters config_fingerprint only when it differs
from its default. tests/data/store_v2 was written by the workflow at format
version 2 (demo teacher, 6 samples, 2 shards, top_k 8); expected_records.npz
holds what the reader returned for it then.
"""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from teacher_logits import LogitStore
from teacher_logits.config import meaning_settings, meaning_settings_json
from teacher_logits.errors import ShardError
from teacher_logits.gather import gather
from teacher_logits.layout import RunLayout
from teacher_logits.store.format import read_attrs
from teacher_logits.store.prepared import read_prepared
from teacher_logits.store.validate import ShardExpectation, validate_shard
from teacher_logits.store.writer import ShardWriter
from teacher_logits.verify import verify

from conftest import REPO

STORE_V2 = Path(__file__).parent / "data" / "store_v2"


@pytest.fixture
def store(tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(STORE_V2, copy)
    return copy


def recorded() -> dict:
    with np.load(STORE_V2 / "expected_records.npz") as data:
        return {key: data[key] for key in data.files}


def assert_reads_as_recorded(path: Path) -> None:
    expected = recorded()
    with LogitStore(path) as reader:
        assert len(reader) == 6 and reader.top_k == 8
        # Made before the cross-tokenizer fields: none, and no record carries their keys.
        assert not reader.has_cross_tokenizer_fields
        for i in range(len(reader)):
            record = reader[i]
            assert record["sample_id"] == int(expected[f"{i}/sample_id"])
            names = {key.split("/")[1] for key in expected if key.startswith(f"{i}/")}
            # Added since the recording: the logsumexp per temperature (here 1.0 alone).
            assert set(record.pop("logsumexp_t")) == {1.0} and reader.temperatures == [1.0]
            assert names - {"sample_id"} == set(record) - {"sample_id"}
            for name in names - {"sample_id"}:
                np.testing.assert_array_equal(record[name], expected[f"{i}/{name}"], err_msg=name)


def test_the_checked_in_store_is_format_version_2_and_reads_as_recorded(store):
    for shard in sorted((store / "shards").glob("*.h5")):
        with h5py.File(shard) as handle:
            assert read_attrs(handle)["format_version"] == 2
    assert_reads_as_recorded(store)
    assert verify(store, deep=True, workers=1) == []


def test_gather_accepts_version_2_shards_beside_shards_written_today(store):
    layout = RunLayout(store)
    prepared = read_prepared(layout.tokens)
    # Shard 1 written again by today's writer from what the reader returns; shard 0 stays
    # the file written at version 2.
    with LogitStore(store) as reader:
        records = [reader.by_sample_id(int(s)) for s in prepared.shard_slice(1)[0]]
    with h5py.File(layout.shard(1)) as handle:
        attrs = {
            k: v for k, v in read_attrs(handle).items() if k not in ("format_version", "top_k")
        }
    sample_ids, offsets, _ = prepared.shard_slice(1)
    writer = ShardWriter(
        layout.shard(1), len(sample_ids), int(offsets[-1]), top_k=8, value_dtype="float16"
    )
    names = ("topk_ids", "topk_logits", "logsumexp", "entropy", "input_ids")
    writer.write_block(
        sample_ids,
        np.diff(offsets),
        {name: np.concatenate([r[name] for r in records]) for name in names},
    )
    writer.commit(attrs)
    layout.index.unlink()
    layout.manifest.unlink()
    gather(layout, workers=1)
    assert_reads_as_recorded(store)


def test_a_newer_format_version_is_refused_naming_the_versions(store):
    layout = RunLayout(store)
    with h5py.File(layout.shard(0), "r+") as handle:
        handle.attrs["format_version"] = 3
    prepared = read_prepared(layout.tokens)
    ids, offsets, input_ids = prepared.shard_slice(0)
    with pytest.raises(ShardError, match="format_version 3, this workflow reads 2 to 2"):
        validate_shard(
            layout.shard(0),
            ShardExpectation(
                sample_ids=ids, offsets=offsets, input_ids=input_ids, attrs={}, vocab_size=2048
            ),
        )


def test_todays_defaults_give_the_fingerprint_settings_of_version_2_shards():
    """A key added since (with its default) must not enter the fingerprint: finished
    shards stay valid across upgrades of the workflow."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["dataset"]["max_samples"] = 6
    config["tokenize"]["max_length"] = 24
    config["generation"]["top_k"] = 8
    plan = json.loads((STORE_V2 / "prepared" / "plan.json").read_text())
    # max_samples left the meaning settings (more rows are appended as new shards); prepare's
    # params still carry it, as such runs recorded them, so upgrading reruns no prepare.
    assert json.loads(meaning_settings_json(config, 6)) == plan["settings"]
    assert "max_samples" not in meaning_settings(config)["dataset"]
    # A meaning key away from its default does enter it.
    config["generation"]["store_masked_only"] = True
    assert json.loads(meaning_settings_json(config, 6)) != plan["settings"]


def test_the_fingerprint_of_version_2_shards_is_what_prepare_computes_today():
    """Recomputed from the checked-in plan's settings and fingerprints: the scheme did not
    move (a format bump must not change it, or mixed stores could not be gathered)."""
    from teacher_logits.fingerprints import config_fingerprint

    plan = json.loads((STORE_V2 / "prepared" / "plan.json").read_text())
    fingerprint = config_fingerprint(
        plan["settings"], plan["teacher_fingerprint"], plan["tokenizer_fingerprint"]
    )
    assert fingerprint == plan["config_fingerprint"]
    # Prepared again today (settings without max_samples), the run keeps that fingerprint.
    from teacher_logits.fingerprints import run_config_fingerprint
    from teacher_logits.run_inputs import without_max_samples

    settings = without_max_samples(plan["settings"])
    assert settings != plan["settings"]
    again = run_config_fingerprint(
        settings, plan["teacher_fingerprint"], plan["tokenizer_fingerprint"], plan
    )
    assert again == plan["config_fingerprint"]
