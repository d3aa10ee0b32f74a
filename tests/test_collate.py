"""collate: the shift convention, chat and masked-only records, crops, padding,
packing (with a real model checking that packed samples cannot see each other) and
a DataLoader with workers over a real store (tests/data/store_v2, checked in)."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from teacher_logits import LogitStore
from teacher_logits.errors import TrainingInputError
from teacher_logits.store.format import needed_rows
from teacher_logits.store.reader import read_sample
from teacher_logits.store.writer import ShardWriter
from teacher_logits.training.collation import collate

STORE_V2 = Path(__file__).parent / "data" / "store_v2"
VOCAB, TOP_K = 40, 4


def make_record(sample_id, length, seed=None, loss_mask=None, temperatures=None):
    rng = np.random.default_rng(sample_id if seed is None else seed)
    full = rng.normal(0.0, 2.0, (length, VOCAB))
    ids = np.argsort(-full, axis=1)[:, :TOP_K]
    record = {
        "sample_id": sample_id,
        "input_ids": rng.integers(0, VOCAB, length).astype(np.int32),
        "topk_ids": ids.astype(np.int32),
        "topk_logits": np.take_along_axis(full, ids, 1).astype(np.float16),
        "logsumexp": np.log(np.exp(full).sum(1)).astype(np.float32),
    }
    if temperatures:
        record["logsumexp_t"] = {
            t: np.log(np.exp(full / t).sum(1)).astype(np.float32) for t in temperatures
        }
    if loss_mask is not None:
        record["loss_mask"] = np.asarray(loss_mask, dtype=np.uint8)
    return record


def expected_labels(record, keep=None):
    ids, n = record["input_ids"], len(record["input_ids"])
    keep = n if keep is None else min(n, keep)
    labels = []
    for t in range(keep):
        trained = t + 1 < n and ("loss_mask" not in record or record["loss_mask"][t + 1])
        labels.append(int(ids[t + 1]) if trained else -100)
    return labels


def test_plain_records_are_shifted_padded_and_typed():
    records = [make_record(7, 5), make_record(3, 3)]
    batch = collate(records, pad_id=99)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "kd_mask",
        "topk_ids",
        "topk_logprobs",
        "logsumexp_t",
        "sample_id",
    }
    dtypes = {name: value.dtype for name, value in batch.items() if name != "logsumexp_t"}
    assert dtypes == {
        "input_ids": torch.int64,
        "attention_mask": torch.bool,
        "labels": torch.int64,
        "kd_mask": torch.bool,
        "topk_ids": torch.int64,
        "topk_logprobs": torch.float32,
        "sample_id": torch.int64,
    }
    assert batch["input_ids"].shape == (2, 5) and batch["topk_ids"].shape == (2, 5, TOP_K)
    assert batch["sample_id"].tolist() == [7, 3]
    assert batch["input_ids"][1].tolist() == [*records[1]["input_ids"], 99, 99]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    ids = records[0]["input_ids"]
    assert batch["labels"][0].tolist() == [*ids[1:].tolist(), -100]
    assert batch["labels"][1].tolist() == [*records[1]["input_ids"][1:].tolist(), -100, -100, -100]
    assert torch.equal(batch["kd_mask"], batch["labels"] != -100)
    for row, record in enumerate(records):
        n = len(record["input_ids"])
        logprobs = record["topk_logits"].astype(np.float32) - record["logsumexp"][:, None]
        np.testing.assert_array_equal(batch["topk_logprobs"][row, :n].numpy(), logprobs)
        np.testing.assert_array_equal(batch["topk_ids"][row, :n].numpy(), record["topk_ids"])
    # Padding rows: zeros, only ever read through kd_mask.
    assert not batch["topk_ids"][1, 3:].any() and not batch["topk_logprobs"][1, 3:].any()
    # A record without logsumexp_t (an older reader) carries temperature 1 only.
    assert list(batch["logsumexp_t"]) == [1.0]
    assert batch["logsumexp_t"][1.0].dtype == torch.float32
    np.testing.assert_array_equal(batch["logsumexp_t"][1.0][0].numpy(), records[0]["logsumexp"])


def test_every_stored_temperature_is_collated():
    records = [
        make_record(0, 6, temperatures=(1.0, 2.0)),
        make_record(1, 2, temperatures=(1.0, 2.0)),
    ]
    batch = collate(records)
    assert sorted(batch["logsumexp_t"]) == [1.0, 2.0]
    np.testing.assert_array_equal(
        batch["logsumexp_t"][2.0][1, :2].numpy(), records[1]["logsumexp_t"][2.0]
    )
    assert batch["logsumexp_t"][2.0].shape == (2, 6) and not batch["logsumexp_t"][2.0][1, 2:].any()


def test_chat_records_train_only_rows_whose_next_token_is_trained():
    mask = [0, 0, 1, 1, 0, 1, 1]
    record = make_record(0, 7, loss_mask=mask)
    batch = collate([record, make_record(1, 3)])
    ids = record["input_ids"]
    assert batch["labels"][0].tolist() == [-100, ids[2], ids[3], -100, ids[5], ids[6], -100]
    assert batch["labels"][0].tolist() == expected_labels(record)
    assert batch["kd_mask"][0].tolist() == [False, True, True, False, True, True, False]


def write_chat_shard(path: Path, records: list[dict], masked_only: bool) -> Path:
    lengths = [len(r["input_ids"]) for r in records]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    loss_mask = np.concatenate([r["loss_mask"] for r in records])
    writer = ShardWriter(
        path,
        num_samples=len(records),
        num_tokens=int(offsets[-1]),
        top_k=TOP_K,
        value_dtype="float32",
        compression="none",
        with_entropy=False,
        with_loss_mask=True,
        stored_rows=needed_rows(loss_mask, offsets) if masked_only else None,
    )
    arrays = {
        name: np.concatenate([r[name] for r in records])
        for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp", "loss_mask")
    }
    arrays["topk_logits"] = arrays["topk_logits"].astype(np.float32)
    writer.write_block([r["sample_id"] for r in records], lengths, arrays)
    return writer.commit({})


def test_masked_only_records_collate_like_the_full_store_on_every_trained_row(tmp_path):
    records = [
        make_record(0, 9, loss_mask=[0, 0, 0, 1, 1, 0, 0, 1, 1]),
        make_record(1, 5, loss_mask=[0, 1, 1, 1, 0]),
        make_record(2, 4, loss_mask=[0, 0, 0, 0]),
    ]
    full_path = write_chat_shard(tmp_path / "full.h5", records, masked_only=False)
    masked_path = write_chat_shard(tmp_path / "masked.h5", records, masked_only=True)
    with h5py.File(full_path) as full, h5py.File(masked_path) as masked:
        full_records = [read_sample(full, i) for i in range(len(records))]
        masked_records = [read_sample(masked, i) for i in range(len(records))]
    assert "row_stored" in masked_records[0] and "row_stored" not in full_records[0]
    for max_length in (None, 7):
        a = collate(full_records, max_length=max_length)
        b = collate(masked_records, max_length=max_length)
        kd = a["kd_mask"]
        assert torch.equal(kd, b["kd_mask"]) and torch.equal(a["labels"], b["labels"])
        assert kd.any()
        for name in ("topk_ids", "topk_logprobs"):
            assert torch.equal(a[name][kd], b[name][kd])
            assert not b[name][~kd].any()  # rows never stored read as zeros
        assert torch.equal(a["logsumexp_t"][1.0][kd], b["logsumexp_t"][1.0][kd])


def test_a_trained_row_that_was_not_stored_is_refused():
    record = make_record(4, 5, loss_mask=[0, 1, 1, 1, 1])
    record["row_stored"] = np.array([1, 0, 1, 1, 0], dtype=np.uint8)
    with pytest.raises(TrainingInputError, match="sample 4: row 1 is trained on but"):
        collate([record])


def test_a_crop_keeps_the_next_original_token_as_the_last_label():
    record = make_record(0, 6)
    batch = collate([record, make_record(1, 2)], max_length=4)
    ids = record["input_ids"]
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][0].tolist() == ids[:4].tolist()
    assert batch["labels"][0].tolist() == ids[1:5].tolist()  # the last is ids[4], cut off
    assert batch["kd_mask"][0].all()
    np.testing.assert_array_equal(batch["topk_ids"][0].numpy(), record["topk_ids"][:4])
    assert batch["labels"][1].tolist() == [*expected_labels(make_record(1, 2)), -100, -100]
    # The chat mask still applies at the crop: here the token after it is not trained.
    chat = make_record(2, 6, loss_mask=[0, 1, 1, 1, 0, 1])
    cropped = collate([chat], max_length=4)
    assert cropped["labels"][0].tolist() == expected_labels(chat, keep=4)
    assert cropped["labels"][0, 3] == -100 and cropped["labels"][0, 2] == chat["input_ids"][3]
    # A crop longer than the sample changes nothing.
    assert torch.equal(collate([record], max_length=60)["labels"], collate([record])["labels"])


@pytest.mark.parametrize("max_length", [1, 0, -3, 2.5, True])
def test_max_length_below_two_is_a_one_line_error(max_length):
    with pytest.raises(TrainingInputError, match="max_length") as caught:
        collate([make_record(0, 5)], max_length=max_length)
    assert "\n" not in str(caught.value)
    assert collate([make_record(0, 5)], max_length=2)["kd_mask"].tolist() == [[True, True]]


def test_pad_to_multiple_of_rounds_the_length_up():
    records = [make_record(0, 5), make_record(1, 3)]
    assert collate(records, pad_to_multiple_of=4)["input_ids"].shape == (2, 8)
    assert collate(records, pad_to_multiple_of=5)["input_ids"].shape == (2, 5)
    assert collate(records, pad_to_multiple_of=1)["input_ids"].shape == (2, 5)
    padded = collate(records, pad_to_multiple_of=16, max_length=3)
    assert padded["input_ids"].shape == (2, 16) and padded["attention_mask"].sum() == 6
    assert padded["kd_mask"].sum() == 5  # 3 + 2: a crop keeps its last label
    with pytest.raises(TrainingInputError, match="pad_to_multiple_of"):
        collate(records, pad_to_multiple_of=0)


def test_packing_puts_samples_end_to_end_without_labels_across_them():
    records = [make_record(0, 5), make_record(1, 1), make_record(2, 4, loss_mask=[0, 1, 0, 1])]
    packed = collate(records, pack=True, pad_to_multiple_of=4)
    padded = collate(records)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape == (1, 12) and packed["topk_ids"].shape == (1, 12, TOP_K)
    assert packed["position_ids"].dtype == torch.int64
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 0, 1]]
    assert packed["cu_seq_lens"].dtype == torch.int32
    assert packed["cu_seq_lens"].tolist() == [0, 5, 6, 10, 12]  # the padding is a segment
    assert packed["max_seq_len"] == 5 and isinstance(packed["max_seq_len"], int)
    labels = [label for r in records for label in expected_labels(r)] + [-100, -100]
    assert packed["labels"][0].tolist() == labels
    assert packed["labels"][0, [4, 5, 9]].tolist() == [-100, -100, -100]  # each sample's last
    assert torch.equal(packed["kd_mask"], packed["labels"] != -100)
    assert packed["sample_id"].tolist() == [0, 1, 2]
    # The same teacher rows as the padded batch, position for position.
    for name in ("input_ids", "labels", "topk_ids", "topk_logprobs"):
        kept = torch.cat([padded[name][i, : len(r["input_ids"])] for i, r in enumerate(records)])
        assert torch.equal(packed[name][0, :10], kept)
    assert torch.equal(
        packed["logsumexp_t"][1.0][0, :10], padded["logsumexp_t"][1.0][padded["attention_mask"]]
    )
    unpadded = collate(records, pack=True)
    assert unpadded["cu_seq_lens"].tolist() == [0, 5, 6, 10] and unpadded["input_ids"].shape == (
        1,
        10,
    )
    cropped = collate(records, pack=True, max_length=3)
    assert cropped["cu_seq_lens"].tolist() == [0, 3, 4, 7] and cropped["max_seq_len"] == 3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_packed_row_gives_each_sample_the_logits_it_gets_alone(attn_implementation):
    """Float32 on CPU: equal to 1e-5 (what reordering the same float32 sums costs),
    while letting samples see each other changes logits by ~0.1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn_implementation
    records = [make_record(i, n) for i, n in enumerate((6, 1, 9, 4))]
    packed = collate(records, pack=True, pad_to_multiple_of=8)
    bounds = packed["cu_seq_lens"].tolist()
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        causal_only = model(input_ids=packed["input_ids"], use_cache=False).logits
        for i, record in enumerate(records):
            alone = model(input_ids=torch.as_tensor(record["input_ids"]).long()[None]).logits[0]
            torch.testing.assert_close(
                logits[0, bounds[i] : bounds[i + 1]], alone, rtol=0, atol=1e-5
            )
            if i:  # without position_ids every later sample would attend to earlier ones
                assert (causal_only[0, bounds[i] : bounds[i + 1]] - alone).abs().max() > 1e-2


def test_bad_batches_are_one_line_errors():
    with pytest.raises(TrainingInputError, match="non-empty list"):
        collate([])
    narrow = make_record(1, 3)
    narrow["topk_ids"], narrow["topk_logits"] = (
        narrow["topk_ids"][:, :2],
        narrow["topk_logits"][:, :2],
    )
    with pytest.raises(TrainingInputError, match="different top_k"):
        collate([make_record(0, 3), narrow])
    with pytest.raises(TrainingInputError, match="different temperatures"):
        collate([make_record(0, 3, temperatures=(1.0, 2.0)), make_record(1, 3)])
    sampled = make_record(2, 3)
    del sampled["topk_ids"], sampled["topk_logits"]
    with pytest.raises(TrainingInputError, match="neither top-k rows nor draws"):
        collate([sampled])


def test_a_dataloader_with_workers_collates_a_real_store():
    store = LogitStore(STORE_V2)
    batches = [[0, 5], [1, 2, 3], [4]]
    for collate_fn in (collate, functools.partial(collate, max_length=16, pack=True)):
        assert pickle.loads(pickle.dumps(collate_fn)) is not None  # spawn workers pickle it
        loader = torch.utils.data.DataLoader(
            store, batch_sampler=batches, collate_fn=collate_fn, num_workers=2
        )
        for indices, batch in zip(batches, loader, strict=True):
            expected = collate_fn([store[i] for i in indices])
            assert batch.keys() == expected.keys()
            for name, value in expected.items():
                if name == "logsumexp_t":
                    assert all(torch.equal(batch[name][t], v) for t, v in value.items())
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(batch[name], value), name
                else:
                    assert batch[name] == value
            assert batch["kd_mask"].any() and batch["topk_logprobs"].dtype == torch.float32
    store.close()


def test_the_package_exports_the_function_not_the_module():
    import teacher_logits.training as training

    for _ in range(2):  # the first lookup imports the module; the second must not see it
        assert callable(training.collate) and training.collate is collate
