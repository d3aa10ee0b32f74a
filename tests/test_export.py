"""``teacher-logits export``, ``info``, ``status`` and ``verify``: the installed command
on the checked-in store (tests/data/store_v2: 6 samples, 2 shards, top_k 8), Parquet
read back through ``datasets``, and the axolotl schema its KD plugin reads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from teacher_logits import LogitStore
from teacher_logits.errors import ExportError, UserError
from teacher_logits.export import (
    AXOLOTL_MATCHED,
    ExportSettings,
    _export_shard,
    _parquet_table,
    _record,
    _staging,
    axolotl_rows,
    export,
)
from teacher_logits.layout import export_file, partial_path
from teacher_logits.store.format import needed_rows
from teacher_logits.store.reader import read_sample
from teacher_logits.store.writer import ShardWriter

from conftest import REPO

STORE_V2 = Path(__file__).parent / "data" / "store_v2"
# The console script of the project's environment (pip install -e . puts it there).
COMMAND = Path(sys.executable).parent / "teacher-logits"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("export") / "store"
    shutil.copytree(STORE_V2, copy)
    return copy


def command(*args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(COMMAND), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def load(folder: Path) -> datasets.Dataset:
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train")


def test_parquet_export_read_back_through_datasets_equals_the_store(store, tmp_path):
    out = tmp_path / "parquet"
    result = command("export", store, out, "--workers", "2")
    assert "2 Parquet files" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    rows = load(out)
    assert set(rows.column_names) == {"sample_id", "input_ids", "topk_ids", "topk_logprobs"}
    with LogitStore(store) as reader:
        assert sorted(rows["sample_id"]) == reader.sample_ids.tolist()
        for row in rows:
            record = reader.by_sample_id(row["sample_id"])
            assert row["input_ids"] == record["input_ids"].tolist()
            assert np.array_equal(row["topk_ids"], record["topk_ids"])
            # logits - logsumexp from the store, in float64: within float32 rounding.
            expected = record["topk_logits"].astype(np.float64) - record["logsumexp"][:, None]
            got = np.asarray(row["topk_logprobs"], dtype=np.float32)
            np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6 * np.abs(expected).max())
        # The store's fingerprints ride in each file's metadata.
        meta = json.loads(pq.read_schema(export_file(out, 1)).metadata[b"teacher_logits"])
        manifest = json.loads((store / "manifest.json").read_text())
        for key in ("config_fingerprint", "teacher_fingerprint", "tokenizer_fingerprint"):
            assert meta[key] == manifest[key]
        assert (meta["shard"], meta["top_k"], meta["format"]) == (1, 8, "parquet")


def test_axolotl_export_has_the_fields_its_kd_collator_and_loss_read(store, tmp_path):
    """axolotl (matched at AXOLOTL_MATCHED) pins torch<=2.12.1 and transformers 5.14.1, so
    it cannot share this environment: the schema its code reads is checked instead.
    A dataset with input_ids, attention_mask and labels is used as pre-tokenized;
    DataCollatorForKD pads target_logprobs, target_token_ids and target_mask ([T][k]
    lists of one length per row); AxolotlKDTrainer's loss pairs target row t with the
    student's logits at t and shifts labels by one for the CE part."""
    assert "067b021c8b87a9e5e380b9173c704cf7340e30f5" in AXOLOTL_MATCHED
    out = tmp_path / "axolotl"
    command("export", store, out, "--format", "axolotl")
    rows = datasets.load_dataset(str(out), split="train")  # axolotl's load of a local folder
    assert rows.column_names == [
        "input_ids",
        "attention_mask",
        "labels",
        "target_token_ids",
        "target_logprobs",
        "target_mask",
    ]
    with LogitStore(store) as reader:
        for row in rows:
            record = reader.by_sample_id(_id_of(reader, row))
            n, k = len(row["input_ids"]), reader.top_k
            assert row["labels"] == row["input_ids"] and row["attention_mask"] == [1] * n
            for name in ("target_token_ids", "target_logprobs", "target_mask"):
                assert len(row[name]) == n and {len(r) for r in row[name]} == {k}, name
            assert np.array_equal(row["target_token_ids"], record["topk_ids"])
            # Renormalised over the top-k, as axolotl's KD strategy makes them.
            probs = np.exp(np.asarray(row["target_logprobs"], dtype=np.float64))
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
            logits = record["topk_logits"].astype(np.float64)
            np.testing.assert_allclose(
                np.log(probs[:, 0] / probs[:, 1]), logits[:, 0] - logits[:, 1], atol=1e-4
            )
            # Every row but the last predicts a trained token.
            assert [set(m) for m in row["target_mask"]] == [{1}] * (n - 1) + [{0}]


def _id_of(reader, row) -> int:
    """The sample whose tokens the row holds (the axolotl rows carry no sample id)."""
    for sample_id in reader.sample_ids:
        if reader.by_sample_id(sample_id)["input_ids"].tolist() == row["input_ids"]:
            return int(sample_id)
    raise AssertionError("an exported row matches no sample")


def test_chat_rows_export_their_loss_mask_and_axolotl_trains_only_those_rows(tmp_path):
    rng = np.random.default_rng(0)
    loss_mask = np.array([0, 0, 1, 1, 0, 1, 1], dtype=np.uint8)
    n, k = len(loss_mask), 4
    logits = -np.sort(-rng.normal(size=(n, k)), axis=1).astype(np.float32)
    arrays = {
        "input_ids": rng.integers(0, 50, n).astype(np.int32),
        "topk_ids": np.stack([rng.choice(50, k, replace=False) for _ in range(n)]).astype(np.int32),
        "topk_logits": logits,
        "logsumexp": (logits.max(axis=1) + 1.0).astype(np.float32),
        "loss_mask": loss_mask,
    }
    writer = ShardWriter(
        tmp_path / "chat.h5",
        num_samples=1,
        num_tokens=n,
        top_k=k,
        value_dtype="float32",
        compression="none",
        with_entropy=False,
        with_loss_mask=True,
        stored_rows=needed_rows(loss_mask, np.array([0, n])),
    )
    writer.write_block([7], [n], arrays)
    with h5py.File(writer.commit({}), "r") as handle:
        record = read_sample(handle, 0)
    rows = axolotl_rows(record)
    assert rows["labels"].tolist() == np.where(loss_mask, arrays["input_ids"], -100).tolist()
    # Row t is trained when token t+1 is (axolotl's loss shifts labels, not targets).
    assert rows["target_mask"][:, 0].tolist() == [0, 1, 1, 0, 1, 1, 0]
    table = _parquet_table([record]).to_pylist()[0]
    assert table["loss_mask"] == loss_mask.tolist()
    assert table["row_stored"] == [0, 1, 1, 0, 1, 1, 0]


def test_an_export_into_a_non_empty_folder_is_refused_naming_overwrite(store, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = command("export", store, out, check=False)
    assert result.returncode == 1
    (line,) = result.stdout.strip().splitlines()
    assert "is not empty" in line and "--overwrite" in line
    assert (out / "mine.txt").read_text() == "keep me"
    command("export", store, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    with pytest.raises(ExportError, match="use one of parquet, axolotl"):
        export(ExportSettings(store, tmp_path / "x", format="csv"))
    assert issubclass(ExportError, UserError)


def test_a_killed_export_leaves_nothing_readable_and_a_rerun_completes_it(store, tmp_path):
    out = tmp_path / "out"
    expected = {p.name: pq.read_table(p) for p in export(ExportSettings(store, out, workers=1))}
    shutil.rmtree(out)
    # What a kill during shard 1 leaves, made by the export's own steps: the staging
    # folder with its record, shard 0 finished, half of shard 1 under its temporary name.
    with LogitStore(store) as reader:
        record = _record(reader, "parquet")
        staging = _staging(out, record)
        _export_shard(reader, 0, export_file(staging, 0), "parquet", record)
    finished = export_file(staging, 0).stat().st_ino
    half = partial_path(export_file(staging, 1))
    half.write_bytes(export_file(staging, 0).read_bytes()[:500])
    assert not out.exists()  # nothing under OUT for a reader to find
    with pytest.raises(Exception, match="Parquet"):  # nor is the half file Parquet
        pq.read_table(half)
    command("export", store, out)
    assert {p.name: pq.read_table(p) for p in out.iterdir()} == expected
    assert export_file(out, 0).stat().st_ino == finished  # kept, not written again
    assert not staging.exists()


def test_info_status_and_verify_through_the_installed_command(store):
    info = command("info", store).stdout
    for words in (
        "vocabulary   2048",
        "samples      6 in 2 shards (0 dropped)",
        "tokens       135",
        "top-k        8",
        "modes        topk, plain text; values float16",
        "temperatures 1.0",
        "format       manifest v2, index v2, shards v2 x2",
        "teacher      466c94310b56492962d834164ee1dd1c (bfloat16)",
    ):
        assert words in info, info
    described = json.loads(command("info", store, "--json").stdout)
    assert described["bytes_per_token"] > 0 and described["format_versions"]["shards"] == {"2": 2}
    assert "all shards done and gathered" in command("status", store).stdout
    assert command("verify", store).stdout.startswith("OK: ")
    # python -m teacher_logits is the same command; the old module entry points still work.
    same = subprocess.run(
        [sys.executable, "-m", "teacher_logits", "info", store],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert same.stdout == info
    old = subprocess.run(
        [sys.executable, "-m", "teacher_logits.verify", store], capture_output=True, text=True
    )
    assert old.returncode == 0 and old.stdout.startswith("OK: ")
    missing = command("info", store / "nowhere", check=False)
    assert missing.returncode == 1 and len(missing.stdout.strip().splitlines()) == 1


def test_draws_of_a_sampled_store_are_columns_and_no_top_k_is_invented():
    record = {
        "sample_id": 3,
        "input_ids": np.array([5, 6, 7], dtype=np.int32),
        "logsumexp": np.zeros(3, dtype=np.float32),
        "sampled_ids": np.array([[1, 2], [3, 0], [4, 5]], dtype=np.int32),
        "sampled_counts": np.array([[3, 1], [4, 0], [2, 2]], dtype=np.uint8),
    }
    row = _parquet_table([record]).to_pylist()[0]
    assert set(row) == {"sample_id", "input_ids", "sampled_ids", "sampled_counts"}
    assert row["sampled_ids"] == [[1, 2], [3, 0], [4, 5]]
    assert row["sampled_counts"] == [[3, 1], [4, 0], [2, 2]]


def test_a_rerun_after_the_store_changed_does_not_keep_the_old_files(store, tmp_path):
    """A killed export of one store, then the store's shards changed (same shape and
    settings): the rerun writes every file again rather than mixing two stores."""
    import json

    out = tmp_path / "out"
    with LogitStore(store) as reader:
        staging = _staging(out, _record(reader, "parquet"))
        _export_shard(reader, 0, export_file(staging, 0), "parquet", _record(reader, "parquet"))
    old_shards = json.loads(pq.read_schema(export_file(staging, 0)).metadata[b"teacher_logits"])[
        "shards_sha256"
    ]
    manifest_path = store / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["shards"][0]["sha256"] = "0" * 64  # as a regenerated shard 0 would have
    manifest_path.write_text(json.dumps(manifest))
    try:
        command("export", store, out)
        made_from = {
            json.loads(pq.read_schema(path).metadata[b"teacher_logits"])["shards_sha256"]
            for path in sorted(out.iterdir())
        }
        assert len(made_from) == 1 and old_shards not in made_from  # the store as it is now
    finally:
        manifest_path.write_text(original)  # the module's store, as the other tests see it
