"""The shard format's loss mask and masked-only storage: write, validate, read back."""

import h5py
import numpy as np
import pytest

from teacher_logits.errors import ShardError
from teacher_logits.store.format import ABSENT_ROW_FILL, needed_rows, stored_row_offsets
from teacher_logits.store.reader import read_sample
from teacher_logits.store.writer import ShardWriter

from test_shard_format import VOCAB, arrays, make_data, validate, write_shard


def test_needed_rows_follow_the_next_token_inside_each_sample():
    offsets = np.array([0, 3, 5, 6])
    mask = np.array([0, 1, 1, 1, 0, 1], dtype=np.uint8)
    # Row t is used when loss_mask[t+1] is 1 and t+1 is in the same sample.
    np.testing.assert_array_equal(needed_rows(mask, offsets), [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        stored_row_offsets(needed_rows(mask, offsets), offsets), [0, 2, 2, 2]
    )


@pytest.fixture
def masked_data():
    data = make_data(seed=4, num_samples=6)
    rng = np.random.default_rng(1)
    loss_mask = (rng.random(int(data.offsets[-1])) < 0.5).astype(np.uint8)
    return data, loss_mask


def write_masked(path, data, loss_mask, masked_only):
    stored = needed_rows(loss_mask, data.offsets) if masked_only else None
    original = ShardWriter.write_rows

    def with_mask(self, rows):  # every block carries its slice of the mask
        r0 = self._rows_done
        original(self, {**rows, "loss_mask": loss_mask[r0 : r0 + len(rows["input_ids"])]})

    ShardWriter.write_rows = with_mask
    try:
        return write_shard(path, data, with_loss_mask=True, stored_rows=stored)
    finally:
        ShardWriter.write_rows = original


@pytest.mark.parametrize("masked_only", [False, True])
def test_loss_mask_round_trip_and_validate(tmp_path, masked_data, masked_only):
    data, loss_mask = masked_data
    path = write_masked(tmp_path / "s.h5", data, loss_mask, masked_only)
    summary = validate(path, data, loss_mask=loss_mask, masked_only=masked_only)
    assert summary.loss_mask_ones == int(loss_mask.sum())
    keep_all = needed_rows(loss_mask, data.offsets)
    assert summary.num_rows == (int(keep_all.sum()) if masked_only else len(loss_mask))
    with h5py.File(path) as f:
        assert f["topk_ids"].shape[0] == summary.num_rows
        for position in range(len(data.sample_ids)):
            r0, r1 = int(data.offsets[position]), int(data.offsets[position + 1])
            rec = read_sample(f, position)
            expected = arrays(data, r0, r1)
            np.testing.assert_array_equal(rec["loss_mask"], loss_mask[r0:r1])
            keep = keep_all[r0:r1] if masked_only else np.ones(r1 - r0, dtype=bool)
            for name in ("topk_ids", "topk_logits", "logsumexp", "entropy"):
                np.testing.assert_array_equal(rec[name][keep], expected[name][keep])
                assert (rec[name][~keep] == ABSENT_ROW_FILL).all()
            assert ("row_stored" in rec) is masked_only


def test_validate_catches_a_wrong_loss_mask_or_layout(tmp_path, masked_data):
    data, loss_mask = masked_data
    full = write_masked(tmp_path / "full.h5", data, loss_mask, masked_only=False)
    other = loss_mask.copy()
    other[3] ^= 1
    with pytest.raises(ShardError, match="loss_mask differs from prepare's at row 3"):
        validate(full, data, loss_mask=other)
    with pytest.raises(ShardError, match="prepare made none"):
        validate(full, data)
    with pytest.raises(ShardError, match="stores the wrong rows"):
        validate(full, data, loss_mask=loss_mask, masked_only=True)
    path = write_masked(tmp_path / "s.h5", data, loss_mask, masked_only=True)
    with pytest.raises(ShardError, match="stores the wrong rows"):
        validate(path, data, loss_mask=loss_mask, masked_only=False)
    with h5py.File(path, "r+") as f:
        f["row_offsets"][1] += 1
    with pytest.raises(ShardError, match="row_offsets"):
        validate(path, data, loss_mask=loss_mask, masked_only=True)


def test_a_shard_with_no_trained_token_stores_no_rows(tmp_path):
    data = make_data(seed=2, num_samples=3)
    zeros = np.zeros(int(data.offsets[-1]), dtype=np.uint8)
    path = write_masked(tmp_path / "s.h5", data, zeros, masked_only=True)
    summary = validate(path, data, loss_mask=zeros, masked_only=True, vocab_size=VOCAB)
    assert summary.num_rows == 0 and summary.loss_mask_ones == 0
    with h5py.File(path) as f:
        assert (read_sample(f, 1)["topk_logits"] == 0).all()
