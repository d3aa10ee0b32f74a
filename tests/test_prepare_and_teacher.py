"""prepare's dataset loading and shard split; the teacher's chunked top-k head."""

import json

import numpy as np
import pytest

from teacher_logits.errors import UserError
from teacher_logits.prepare import split_shards
from teacher_logits.tokenization import load_column


def texts_of(path, split, text_field, max_samples):
    return load_column(path, split, text_field, max_samples)[text_field]


TEXTS = ["first text", "second one", "", "fourth"]


def _write_all_formats(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS, "other": [1, 2, 3, 4]})
    json_array = tmp_path / "d.json"
    json_array.write_text(json.dumps([{"text": t, "other": i} for i, t in enumerate(TEXTS)]))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t, "other": i}) + "\n" for i, t in enumerate(TEXTS))
    )
    parquet = tmp_path / "d.parquet"
    ds.to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(saved))
    arrow_dir = tmp_path / "arrow_single"
    ds.save_to_disk(str(arrow_dir))
    arrow = next(arrow_dir.glob("*.arrow"))
    return {
        "json": json_array,
        "jsonl": jsonl,
        "parquet": parquet,
        "save_to_disk": saved,
        "arrow": arrow,
    }


def test_every_dataset_format_loads_in_row_order(tmp_path):
    for name, path in _write_all_formats(tmp_path).items():
        assert list(texts_of(path, "train", "text", None)) == TEXTS, name
    saved = tmp_path / "saved"
    assert list(texts_of(saved, "test", "text", None)) == TEXTS[:1]
    assert list(texts_of(tmp_path / "d.jsonl", "train", "text", 2)) == TEXTS[:2]


def test_dataset_errors_name_the_fix(tmp_path):
    paths = _write_all_formats(tmp_path)
    with pytest.raises(UserError, match="dataset.text_field"):
        texts_of(paths["jsonl"], "train", "body", None)
    with pytest.raises(UserError, match="dataset.split"):
        texts_of(paths["save_to_disk"], "validation", "text", None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(UserError, match="could not read"):
        texts_of(broken, "train", "text", None)


def test_split_shards_balances_tokens_and_never_leaves_a_shard_empty():
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(4, 1, size=1000).astype(np.int64) + 1
    bounds = split_shards(lengths, 8)
    assert bounds[0] == 0 and bounds[-1] == 1000 and (np.diff(bounds) > 0).all()
    per_shard = [lengths[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(per_shard) / min(per_shard) < 1.3
    # More shards than a skewed distribution can balance: still none empty.
    skewed = np.array([1000, 1, 1, 1, 1])
    assert (np.diff(split_shards(skewed, 5)) == 1).all()


def _tiny_model(arch: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if arch == "gemma2":
        config = AutoConfig.for_model("gemma2", final_logit_softcapping=5.0, **common)
    else:
        config = AutoConfig.for_model("llama", **common)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch,chunked", [("llama", True), ("gemma2", False)])
def test_topk_head_matches_the_models_own_logits(arch, chunked):
    import torch

    from teacher_logits.generation.teacher import TopKHead

    model = _tiny_model(arch)
    # A tiny chunk budget: 4 rows per chunk, so many chunks per batch.
    head = TopKHead(model, top_k=5, chunk_bytes=4 * 300 * 4)
    assert head.chunk_rows == 4
    assert head.chunked is chunked  # soft-capping after lm_head forbids the chunked head
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    result = head(ids, mask)
    assert result.ids.shape == (int(mask.sum()), 5)
    rows = []
    for b in range(3):
        n = int(mask[b].sum())
        with torch.no_grad():
            rows.append(model(ids[b : b + 1, :n]).logits[0].float())
    expected = torch.cat(rows)
    torch.testing.assert_close(
        result.logsumexp, torch.logsumexp(expected, -1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        result.logits, torch.topk(expected, 5, -1).values, atol=1e-5, rtol=1e-5
    )
    if arch == "gemma2":
        assert result.logits.abs().max() <= 5.0 + 1e-4  # the soft-cap was applied


def test_topk_head_never_projects_more_rows_than_a_chunk():
    """The output head only ever sees <= chunk_rows rows, so no [batch, seq, vocab] tensor."""
    import torch

    from teacher_logits.generation.teacher import TopKHead

    model = _tiny_model("llama")
    head = TopKHead(model, top_k=5, chunk_bytes=16 * 300 * 4)
    seen = []
    hook = head.head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    try:
        ids = torch.randint(0, 300, (8, 64))  # 512 rows, 32 chunks of 16
        head(ids, torch.ones_like(ids))
    finally:
        hook.remove()
    assert len(seen) == 32
    assert all(shape == (16, 300) for shape in seen)
