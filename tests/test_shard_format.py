"""Unit tests for teacher_logits.store:  writing, reading and validating shards.

Real HDF5 files in tmp_path; corruption is done on the bytes / with h5py itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher_logits.errors import ShardError  # noqa: E402
from teacher_logits.layout import partial_path as temp_path_for  # noqa: E402
from teacher_logits.store.codec import decode_topk, encode_topk  # noqa: E402
from teacher_logits.store.format import (  # noqa: E402
    COMPRESSIONS,
    FORMAT_VERSION,
    REQUIRED_ATTRS,
    compression_options,
    read_attrs,
)
from teacher_logits.store.prepared import PreparedTokens, read_prepared, write_prepared  # noqa: E402
from teacher_logits.store.reader import read_sample  # noqa: E402
from teacher_logits.store.validate import ShardExpectation, validate_shard  # noqa: E402
from teacher_logits.store.writer import ShardWriter  # noqa: E402

TOP_K = 8
VOCAB = 100


@dataclass
class Data:
    sample_ids: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray  # float16
    logsumexp: np.ndarray
    entropy: np.ndarray
    attrs: dict


def make_data(seed: int = 0, num_samples: int = 5, top_k: int = TOP_K, vocab: int = VOCAB) -> Data:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 13, num_samples).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    num_tokens = int(offsets[-1])
    sample_ids = np.sort(rng.choice(1000, num_samples, replace=False)).astype(np.int64)
    input_ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    topk_ids = np.stack([rng.choice(vocab, top_k, replace=False) for _ in range(num_tokens)])
    topk_ids = topk_ids.astype(np.int32)
    # make the next token the top-1 candidate on some rows so next_token_in_topk counts
    for t in range(0, num_tokens - 1, 2):
        nxt = input_ids[t + 1]
        row = [i for i in topk_ids[t] if i != nxt][: top_k - 1]
        topk_ids[t] = [nxt, *row]
    logits = -np.sort(-rng.normal(0.0, 3.0, (num_tokens, top_k)), axis=1)
    logits16 = logits.astype(np.float16)
    # Rank order as the reader returns it: equal float16 values by ascending id.
    for t in range(num_tokens):
        order = np.lexsort((topk_ids[t], -logits16[t].astype(np.float32)))
        topk_ids[t], logits16[t] = topk_ids[t][order], logits16[t][order]
    as32 = logits16.astype(np.float64)
    # logsumexp over the "whole vocabulary": the top-k plus some tail mass, so > max logit
    tail = np.exp(as32[:, 0]) * rng.uniform(0.1, 2.0, num_tokens)
    lse = np.log(np.exp(as32).sum(axis=1) + tail).astype(np.float32)
    entropy = rng.uniform(0.0, 5.0, num_tokens).astype(np.float16)
    attrs = {
        "shard_index": 3,
        "num_shards": 7,
        "teacher_fingerprint": "teacher-abc",
        "tokenizer_fingerprint": "tok-def",
        "config_fingerprint": "cfg-123",
        "cuda_visible_devices": "0,1",
        "hostname": "node-1",
        "started_at": 1700000000.5,
        "finished_at": 1700000100.25,
        "versions": {"torch": "2.5.0", "transformers": "4.46.0"},
        "claims": [
            {
                "cuda_visible_devices": "0,1",
                "hostname": "node-1",
                "started_at": 1700000000.5,
                "finished_at": 1700000100.25,
                "rows": num_tokens,
            }
        ],
    }
    return Data(sample_ids, lengths, offsets, input_ids, topk_ids, logits16, lse, entropy, attrs)


def arrays(data: Data, r0: int, r1: int) -> dict:
    return {
        "input_ids": data.input_ids[r0:r1],
        "topk_ids": data.topk_ids[r0:r1],
        "topk_logits": data.topk_logits[r0:r1],
        "logsumexp": data.logsumexp[r0:r1],
        "entropy": data.entropy[r0:r1],
    }


def write_shard(path: Path, data: Data, compression: str = "default", split: int = 2, **kw) -> Path:
    writer = ShardWriter(
        path,
        num_samples=len(data.sample_ids),
        num_tokens=int(data.offsets[-1]),
        top_k=data.topk_ids.shape[1],
        compression=compression,
        **kw,
    )
    try:
        for s0, s1 in ((0, split), (split, len(data.sample_ids))):
            r0, r1 = int(data.offsets[s0]), int(data.offsets[s1])
            writer.write_block(data.sample_ids[s0:s1], data.lengths[s0:s1], arrays(data, r0, r1))
        return writer.commit(data.attrs)
    except BaseException:
        writer.abort()
        raise


def validate(path: Path, data: Data, progress=None, **overrides):
    args = dict(
        sample_ids=data.sample_ids,
        offsets=data.offsets,
        input_ids=data.input_ids,
        attrs={k: data.attrs[k] for k in ("config_fingerprint", "shard_index")},
        vocab_size=VOCAB,
    )
    args.update(overrides)
    return validate_shard(path, ShardExpectation(**args), progress=progress)


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def shard(tmp_path, data):
    return write_shard(tmp_path / "shards" / "shard_00003.h5", data)


# --------------------------------------------------------------------------------------
# writing and reading
# --------------------------------------------------------------------------------------


def test_write_commit_and_read_back(tmp_path, data):
    path = tmp_path / "shards" / "shard_00003.h5"
    result = write_shard(path, data)
    assert result == path
    assert path.is_file()
    assert not temp_path_for(path).exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard_00003.h5"]

    with h5py.File(path, "r") as f:
        attrs = read_attrs(f)
        for key in REQUIRED_ATTRS:
            assert key in attrs
        assert attrs["format_version"] == FORMAT_VERSION == 2
        assert attrs["topk_encoding"] == "sorted_id_delta"
        assert attrs["top_k"] == TOP_K
        assert attrs["claims"] == data.attrs["claims"]
        assert isinstance(attrs["claims"], list) and isinstance(attrs["claims"][0], dict)
        assert attrs["versions"] == data.attrs["versions"]
        assert attrs["config_fingerprint"] == "cfg-123"
        assert isinstance(attrs["config_fingerprint"], str)
        assert attrs["shard_index"] == 3
        assert attrs["started_at"] == data.attrs["started_at"]

        # dtypes and shapes of the format
        assert f["sample_ids"].dtype == np.int64
        assert f["offsets"].dtype == np.int64
        assert f["input_ids"].dtype == np.int32
        assert f["topk_ids"].dtype == np.int32
        assert f["topk_logits"].dtype == np.float16
        assert f["logsumexp"].dtype == np.float32
        assert f["entropy"].dtype == np.float16
        assert f["topk_ids"].shape == (int(data.offsets[-1]), TOP_K)
        np.testing.assert_array_equal(f["sample_ids"][:], data.sample_ids)
        np.testing.assert_array_equal(f["offsets"][:], data.offsets)

        offsets = f["offsets"][:]
        for position in range(len(data.sample_ids)):
            r0, r1 = int(data.offsets[position]), int(data.offsets[position + 1])
            for record in (
                read_sample(f, position),
                read_sample(f, position, offsets),
            ):
                assert record["sample_id"] == data.sample_ids[position]
                np.testing.assert_array_equal(record["input_ids"], data.input_ids[r0:r1])
                np.testing.assert_array_equal(record["topk_ids"], data.topk_ids[r0:r1])
                np.testing.assert_array_equal(record["topk_logits"], data.topk_logits[r0:r1])
                np.testing.assert_array_equal(record["logsumexp"], data.logsumexp[r0:r1])
                np.testing.assert_array_equal(record["entropy"], data.entropy[r0:r1])
                assert "loss_mask" not in record


def test_validate_shard_passes_with_sensible_summary(shard, data):
    summary = validate(shard, data)
    num_tokens = int(data.offsets[-1])
    assert summary.num_samples == len(data.sample_ids)
    assert summary.num_tokens == num_tokens
    np.testing.assert_array_equal(summary.sample_ids, data.sample_ids)
    np.testing.assert_array_equal(summary.offsets, data.offsets)
    assert summary.attrs["claims"] == data.attrs["claims"]
    # top-k mass: per row in (0, 1], so the sum lies between 0 and num_tokens
    assert 0.0 < summary.stats.topk_mass_sum / num_tokens < 1.0
    assert summary.stats.topk_mass_hist.sum() == num_tokens
    logits = data.topk_logits.astype(np.float64)
    mass = np.exp(logits - data.logsumexp[:, None]).sum(axis=1)
    assert summary.stats.topk_mass_sum == pytest.approx(mass.sum(), rel=1e-4)
    assert summary.stats.entropy_sum == pytest.approx(
        data.entropy.astype(np.float64).sum(), rel=1e-3
    )
    # next-token hits, counted independently
    rows = hits = 0
    for s in range(len(data.sample_ids)):
        for t in range(int(data.offsets[s]), int(data.offsets[s + 1]) - 1):
            rows += 1
            hits += int(data.input_ids[t + 1] in data.topk_ids[t])
    assert summary.stats.next_token_rows == rows == num_tokens - len(data.sample_ids)
    assert summary.stats.next_token_in_topk == hits
    assert 0 < hits <= rows


def test_validate_without_entropy(tmp_path, data):
    path = write_shard(tmp_path / "s.h5", data, with_entropy=False)
    with h5py.File(path, "r") as f:
        assert "entropy" not in f
        assert "entropy" not in read_sample(f, 0)
    summary = validate(path, data)
    assert summary.stats.entropy_sum == 0.0


def test_float32_values(tmp_path, data):
    path = write_shard(tmp_path / "s.h5", data, value_dtype="float32")
    with h5py.File(path, "r") as f:
        assert f["topk_logits"].dtype == np.float32
        _, values = decode_topk(f["topk_ids"][:], f["topk_logits"][:])
        np.testing.assert_array_equal(values, data.topk_logits.astype(np.float32))
    validate(path, data)


def test_abort_removes_temp_file(tmp_path, data):
    path = tmp_path / "shard.h5"
    writer = ShardWriter(path, len(data.sample_ids), int(data.offsets[-1]), TOP_K)
    temp = temp_path_for(path)
    assert temp.name == "shard.h5.partial"
    assert temp.exists()
    writer.write_block(data.sample_ids[:2], data.lengths[:2], arrays(data, 0, int(data.offsets[2])))
    writer.abort()
    assert not temp.exists()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_commit_before_all_rows_raises(tmp_path, data):
    path = tmp_path / "shard.h5"
    writer = ShardWriter(path, len(data.sample_ids), int(data.offsets[-1]), TOP_K)
    try:
        writer.write_block(
            data.sample_ids[:2], data.lengths[:2], arrays(data, 0, int(data.offsets[2]))
        )
        with pytest.raises(ShardError, match="incomplete"):
            writer.commit(data.attrs)
        assert not path.exists()
    finally:
        writer.abort()
    assert not temp_path_for(path).exists()
    assert not path.exists()


def test_write_more_than_planned_raises(tmp_path, data):
    path = tmp_path / "shard.h5"
    n = len(data.sample_ids)
    writer = ShardWriter(path, n - 1, int(data.offsets[n - 1]), TOP_K)
    try:
        with pytest.raises(ShardError, match="more (rows|samples)"):
            writer.write_block(
                data.sample_ids, data.lengths, arrays(data, 0, int(data.offsets[-1]))
            )
    finally:
        writer.abort()


def test_new_writer_replaces_a_stale_partial(tmp_path, data):
    path = tmp_path / "shard.h5"
    temp_path_for(path).write_bytes(b"left behind by a killed job")
    write_shard(path, data)
    validate(path, data)
    assert not temp_path_for(path).exists()


# --------------------------------------------------------------------------------------
# validate_shard catches corruption
# --------------------------------------------------------------------------------------


def test_validate_missing_file(tmp_path, data):
    with pytest.raises(ShardError, match="missing"):
        validate(tmp_path / "nope.h5", data)


def test_validate_truncated_file(shard, data):
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(ShardError, match="not a readable HDF5 file|unreadable"):
        validate(shard, data)


def test_validate_garbage_file(tmp_path, data):
    path = tmp_path / "garbage.h5"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ShardError, match="not a readable HDF5 file"):
        validate(path, data)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("compression", ["none", "default", "gzip"])
@pytest.mark.parametrize("dataset", ["topk_logits", "topk_ids", "input_ids", "logsumexp"])
def test_validate_flipped_byte_in_checksummed_data(tmp_path, data, compression, dataset):
    path = write_shard(tmp_path / "s.h5", data, compression=compression)
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    flip_byte(path, info.byte_offset + info.size // 2)
    with pytest.raises(ShardError):
        validate(path, data)


def test_validate_flipped_byte_in_the_middle_of_a_larger_file(tmp_path):
    # enough rows that the middle of the file is data, not metadata
    data = make_data(seed=5, num_samples=400)
    path = write_shard(tmp_path / "s.h5", data, compression="none", split=150)
    validate(path, data)
    size = path.stat().st_size
    with h5py.File(path, "r") as f:
        spans = [
            (info.byte_offset, info.byte_offset + info.size)
            for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp", "entropy")
            for info in [f[name].id.get_chunk_info(i) for i in range(f[name].id.get_num_chunks())]
        ]
    middle = size // 2
    assert any(a <= middle < b for a, b in spans), "the middle byte is not checksummed data"
    flip_byte(path, middle)
    with pytest.raises(ShardError, match="unreadable"):
        validate(path, data)


def test_validate_deleted_dataset(shard, data):
    with h5py.File(shard, "r+") as f:
        del f["topk_logits"]
    with pytest.raises(ShardError, match="topk_logits"):
        validate(shard, data)


def test_validate_missing_attribute(shard, data):
    with h5py.File(shard, "r+") as f:
        del f.attrs["claims"]
    with pytest.raises(ShardError, match="missing attributes.*claims"):
        validate(shard, data)


def test_validate_wrong_format_version(shard, data):
    with h5py.File(shard, "r+") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(ShardError, match="format_version 1"):
        validate(shard, data)


def test_shard_stores_ids_sorted_as_deltas(shard, data):
    with h5py.File(shard, "r") as f:
        deltas, values = f["topk_ids"][:], f["topk_logits"][:]
    ids = np.cumsum(deltas, axis=1)
    assert (np.diff(ids, axis=1) > 0).all()
    for t in range(len(ids)):
        np.testing.assert_array_equal(np.sort(data.topk_ids[t]), ids[t])
        by_id = dict(zip(data.topk_ids[t], data.topk_logits[t].view(np.uint16)))
        assert [by_id[i] for i in ids[t]] == list(values[t].view(np.uint16))


@pytest.mark.parametrize(
    "delta, why", [(VOCAB, "outside the vocabulary"), (-500, "repeated or unordered")]
)
def test_validate_id_outside_vocab(shard, data, delta, why):
    with h5py.File(shard, "r+") as f:
        deltas = f["topk_ids"][2]
        deltas[-1] += delta
        f["topk_ids"][2] = deltas
    with pytest.raises(ShardError, match=why):
        validate(shard, data)


def test_validate_negative_first_id(shard, data):
    with h5py.File(shard, "r+") as f:
        deltas = f["topk_ids"][2]
        deltas[0] = -1
        f["topk_ids"][2] = deltas
    with pytest.raises(ShardError, match="repeated or unordered"):
        validate(shard, data)


def test_validate_repeated_ids_in_a_row(shard, data):
    with h5py.File(shard, "r+") as f:
        deltas = f["topk_ids"][1]
        deltas[3] = 0
        f["topk_ids"][1] = deltas
    with pytest.raises(ShardError, match="repeated"):
        validate(shard, data)


def test_validate_non_finite(shard, data):
    with h5py.File(shard, "r+") as f:
        lse = f["logsumexp"][:]
        lse[0] = np.nan
        f["logsumexp"][:] = lse
    with pytest.raises(ShardError, match="non-finite"):
        validate(shard, data)


def test_validate_logsumexp_below_top_logit(shard, data):
    with h5py.File(shard, "r+") as f:
        lse = f["logsumexp"][:]
        lse[3] = float(data.topk_logits[3, 0]) - 5.0
        f["logsumexp"][:] = lse
    with pytest.raises(ShardError, match="logsumexp smaller"):
        validate(shard, data)


def test_validate_wrong_config_fingerprint(shard, data):
    with pytest.raises(ShardError, match="config_fingerprint"):
        validate(shard, data, attrs={"config_fingerprint": "cfg-other"})


def test_validate_wrong_config_fingerprint_in_file(shard, data):
    with h5py.File(shard, "r+") as f:
        f.attrs["config_fingerprint"] = "cfg-stale"
    with pytest.raises(ShardError, match="config_fingerprint='cfg-stale'"):
        validate(shard, data)


def test_validate_input_ids_differ(shard, data):
    expected = data.input_ids.copy()
    expected[6] = (expected[6] + 1) % VOCAB
    with pytest.raises(ShardError, match="input_ids differ.*row 6"):
        validate(shard, data, input_ids=expected)


def test_validate_sample_ids_differ(shard, data):
    expected = data.sample_ids.copy()
    expected[1] += 1
    with pytest.raises(ShardError, match="sample_ids differ"):
        validate(shard, data, sample_ids=expected)


def test_validate_offsets_differ(shard, data):
    # same total tokens, different split between two samples
    expected = data.offsets.copy()
    lengths = data.lengths
    i = int(np.flatnonzero(lengths > 1)[0])
    expected[i + 1] -= 1
    with pytest.raises(ShardError, match="offsets differ"):
        validate(shard, data, offsets=expected)


def test_validate_shape_mismatch(shard, data):
    # the plan says one more sample (and more tokens) than the file holds
    expected_ids = np.append(data.sample_ids, 9999)
    expected_offsets = np.append(data.offsets, data.offsets[-1] + 3)
    with pytest.raises(ShardError, match="shape"):
        validate(shard, data, sample_ids=expected_ids, offsets=expected_offsets)


# --------------------------------------------------------------------------------------
# compression options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_round_trips_exactly(tmp_path, compression):
    data = make_data(seed=11, num_samples=40)
    path = write_shard(tmp_path / f"{compression}.h5", data, compression=compression, split=17)
    with h5py.File(path, "r") as f:
        assert f["topk_logits"].fletcher32
        np.testing.assert_array_equal(f["input_ids"][:], data.input_ids)
        ids, logits = decode_topk(f["topk_ids"][:], f["topk_logits"][:])
        np.testing.assert_array_equal(ids, data.topk_ids)
        assert logits.dtype == np.float16
        # bit-exact, not just close
        np.testing.assert_array_equal(logits.view(np.uint16), data.topk_logits.view(np.uint16))
        np.testing.assert_array_equal(f["logsumexp"][:], data.logsumexp)
        np.testing.assert_array_equal(f["entropy"][:], data.entropy)
    validate(path, data)


def test_compression_options_contents():
    for name in COMPRESSIONS:
        assert compression_options(name)["fletcher32"] is True
    assert compression_options("gzip")["compression"] == "gzip"
    assert compression_options("lzf")["compression"] == "lzf"
    assert "compression" not in compression_options("none")


def test_bogus_compression_raises(tmp_path):
    with pytest.raises(ShardError, match="bogus") as info:
        compression_options("bogus")
    for name in COMPRESSIONS:
        assert name in str(info.value)


def test_bogus_compression_in_writer(tmp_path):
    path = tmp_path / "shard.h5"
    with pytest.raises(ShardError, match="storage.compression"):
        ShardWriter(path, 1, 1, TOP_K, compression="bogus")
    assert not path.exists()


# --------------------------------------------------------------------------------------
# prepare's tokens file
# --------------------------------------------------------------------------------------


def make_prepared(seed: int = 3) -> PreparedTokens:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 20, 12)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return PreparedTokens(
        sample_ids=np.array([0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 13, 14], dtype=np.int64),
        offsets=offsets,
        input_ids=rng.integers(0, 50000, int(offsets[-1])).astype(np.int32),
        shard_bounds=np.array([0, 4, 9, 12], dtype=np.int64),
    )


def test_prepared_round_trip(tmp_path):
    prepared = make_prepared()
    path = tmp_path / "tokens.h5"
    write_prepared(path, prepared)
    assert path.exists()
    assert not temp_path_for(path).exists()
    back = read_prepared(path)
    for name in ("sample_ids", "offsets", "input_ids", "shard_bounds"):
        np.testing.assert_array_equal(getattr(back, name), getattr(prepared, name))
    assert back.sample_ids.dtype == np.int64
    assert back.offsets.dtype == np.int64
    assert back.input_ids.dtype == np.int32
    assert back.shard_bounds.dtype == np.int64
    assert back.num_shards == 3


def test_prepared_shard_slice_rebases_offsets(tmp_path):
    prepared = make_prepared()
    write_prepared(tmp_path / "tokens.h5", prepared)
    back = read_prepared(tmp_path / "tokens.h5")
    pieces = []
    for shard in range(back.num_shards):
        ids, offsets, input_ids = back.shard_slice(shard)
        s0, s1 = int(back.shard_bounds[shard]), int(back.shard_bounds[shard + 1])
        np.testing.assert_array_equal(ids, prepared.sample_ids[s0:s1])
        assert offsets[0] == 0
        assert len(offsets) == len(ids) + 1
        assert offsets[-1] == len(input_ids)
        np.testing.assert_array_equal(np.diff(offsets), np.diff(prepared.offsets[s0 : s1 + 1]))
        r0 = int(prepared.offsets[s0])
        np.testing.assert_array_equal(input_ids, prepared.input_ids[r0 : int(prepared.offsets[s1])])
        # each sample's tokens are where the rebased offsets say
        for j in range(len(ids)):
            g = s0 + j
            np.testing.assert_array_equal(
                input_ids[offsets[j] : offsets[j + 1]],
                prepared.input_ids[prepared.offsets[g] : prepared.offsets[g + 1]],
            )
        pieces.append(input_ids)
    np.testing.assert_array_equal(np.concatenate(pieces), prepared.input_ids)


def test_shard_slice_feeds_a_valid_shard(tmp_path):
    """prepare's slice is exactly what validate_shard expects of the shard written from it."""
    prepared = make_prepared()
    ids, offsets, input_ids = prepared.shard_slice(1)
    base = make_data(seed=2, num_samples=len(ids))
    rng = np.random.default_rng(0)
    num_tokens = int(offsets[-1])
    logits = (-np.sort(-rng.normal(0, 2, (num_tokens, TOP_K)), axis=1)).astype(np.float16)
    data = Data(
        sample_ids=ids,
        lengths=np.diff(offsets),
        offsets=offsets,
        input_ids=input_ids,
        topk_ids=np.stack(
            [rng.choice(VOCAB, TOP_K, replace=False) for _ in range(num_tokens)]
        ).astype(np.int32),
        topk_logits=logits,
        logsumexp=(np.log(np.exp(logits.astype(np.float64)).sum(axis=1)) + 0.5).astype(np.float32),
        entropy=rng.uniform(0, 3, num_tokens).astype(np.float16),
        attrs={**base.attrs, "shard_index": 1, "num_shards": prepared.num_shards},
    )
    path = write_shard(tmp_path / "shard_00001.h5", data)
    summary = validate(path, data)
    assert summary.num_tokens == num_tokens
    assert summary.num_samples == len(ids)


def test_cpu_mode_empty_device_string_round_trips(tmp_path, data):
    data.attrs = {
        **data.attrs,
        "cuda_visible_devices": "",
        "claims": [{**data.attrs["claims"][0], "cuda_visible_devices": ""}],
    }
    path = write_shard(tmp_path / "cpu.h5", data)
    summary = validate(path, data, attrs={"cuda_visible_devices": ""})
    assert summary.attrs["cuda_visible_devices"] == ""
    assert summary.attrs["claims"][0]["cuda_visible_devices"] == ""


# --------------------------------------------------------------------------------------
# Known bug: validate_shard lets non-ShardError exceptions escape for some corruptions.
# gather.py catches only ShardError, so such a shard crashes gather with a traceback
# instead of being listed with the "Regenerate them with: ..." hint.
# --------------------------------------------------------------------------------------


def test_validate_corrupt_claims_attribute_is_a_shard_error(shard, data):
    with h5py.File(shard, "r+") as f:
        f.attrs["claims"] = '[{"cuda_visible_devices": "0,1", "hostn'  # cut short
    try:
        validate(shard, data)
    except ShardError:
        return
    pytest.fail("no error for a corrupt claims attribute")


def test_validate_group_in_place_of_dataset_is_a_shard_error(shard, data):
    with h5py.File(shard, "r+") as f:
        del f["topk_logits"]
        f.create_group("topk_logits")
    with pytest.raises(ShardError, match="topk_logits"):
        validate(shard, data)


FLIP_SCAN = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import test_shard_format as t
from teacher_logits.errors import ShardError
work = Path(sys.argv[3])
data = t.make_data(0)
orig = t.write_shard(work / "s.h5", data, compression="none").read_bytes()
q = work / "q.h5"
escaped = {}
for off in range(int(sys.argv[4])):
    b = bytearray(orig); b[off] ^= 0xFF; q.write_bytes(bytes(b))
    try:
        t.validate(q, data)
    except ShardError:
        pass
    except Exception as e:
        escaped[off] = type(e).__name__ + ": " + str(e)[:80]
print(json.dumps(escaped))
"""


def test_validate_header_byte_flips_are_all_shard_errors(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", FLIP_SCAN, str(root), str(root / "tests"), str(tmp_path), "800"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"validation crashed the interpreter: {result.stderr[-500:]}"
    import json

    escaped = json.loads(result.stdout.strip().splitlines()[-1])
    assert not escaped, (
        f"{len(escaped)} flips escaped as non-ShardError, e.g. {list(escaped.items())[:3]}"
    )


# --------------------------------------------------------------------------------------
# top-k encoding (format version 2)
# --------------------------------------------------------------------------------------


def canonical(ids, values):
    """Rank order: value descending (+0 before -0), equal values by ascending id."""
    out_ids, out_values = ids.copy(), values.copy()
    for t in range(len(ids)):
        order = np.lexsort((ids[t], np.signbit(values[t]), -values[t].astype(np.float64)))
        out_ids[t], out_values[t] = ids[t][order], values[t][order]
    return out_ids, out_values


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("top_k", [1, 2, 7, 64, 300])
def test_encode_decode_round_trip_with_ties_and_signs(dtype, top_k):
    rng = np.random.default_rng(top_k)
    vocab = 5000
    ids = np.stack([rng.choice(vocab, top_k, replace=False) for _ in range(50)]).astype(np.int32)
    # few distinct values: many exact ties, both signs, zeros of both signs, infinities
    pool = np.array([9.5, 3.0, 0.5, 0.0, -0.0, -0.5, -3.0, -60000.0, -np.inf], dtype=dtype)
    values = rng.choice(pool, (50, top_k))
    values = -np.sort(-values, axis=1)
    deltas, by_id = encode_topk(ids, values)
    assert deltas.dtype == np.int32 and by_id.dtype == dtype
    assert (deltas[:, 1:] >= 1).all() and (deltas[:, 0] >= 0).all()
    got_ids, got_values = decode_topk(deltas, by_id)
    want_ids, want_values = canonical(ids, values)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_values.view(np.uint8), want_values.view(np.uint8))
    # decoding a canonical row gives it back bit for bit
    again = decode_topk(*encode_topk(got_ids, got_values))
    np.testing.assert_array_equal(again[0], got_ids)


def test_encode_decode_empty():
    deltas, values = encode_topk(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float16))
    ids, values = decode_topk(deltas, values)
    assert ids.shape == values.shape == (0, 4)


def test_writer_buffers_rows_into_whole_chunks(tmp_path, monkeypatch):
    # Tiny chunks and odd write sizes: rows straddle chunk edges in every way.
    import teacher_logits.store.writer

    monkeypatch.setattr(teacher_logits.store.writer, "CHUNK_ROWS", 4)
    data = make_data(seed=3, num_samples=30)
    writer = ShardWriter(tmp_path / "s.h5", len(data.sample_ids), int(data.offsets[-1]), TOP_K)
    writer.add_samples(data.sample_ids, data.lengths)
    r0 = 0
    for size in [1, 3, 5, 2, 7, 4, 11] * 100:
        r1 = min(r0 + size, int(data.offsets[-1]))
        if r1 > r0:
            writer.write_rows(arrays(data, r0, r1))
        r0 = r1
    path = writer.commit(data.attrs)
    validate(path, data)
    with h5py.File(path, "r") as f:
        for position in range(len(data.sample_ids)):
            record = read_sample(f, position)
            a, b = int(data.offsets[position]), int(data.offsets[position + 1])
            np.testing.assert_array_equal(record["topk_ids"], data.topk_ids[a:b])
            np.testing.assert_array_equal(record["topk_logits"], data.topk_logits[a:b])
