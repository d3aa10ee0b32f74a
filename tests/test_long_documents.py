"""Long documents (tokenize.overflow: split): kept whole, computed in overlapping windows."""

import json

import numpy as np
import pytest

from teacher_logits import LogitStore
from teacher_logits.generation.batching import long_document_windows


@pytest.mark.parametrize("max_length,stride", [(10, 3), (8, 0), (5, 4), (64, 16)])
def test_windows_keep_every_row_once_with_the_most_context(max_length, stride):
    rng = np.random.default_rng(max_length)
    lengths = np.concatenate([[1, max_length, max_length + 1], rng.integers(1, 9 * max_length, 40)])
    cut = long_document_windows(lengths, max_length, stride)
    for sample, n in enumerate(lengths):
        mine = np.flatnonzero(cut["sample"] == sample)
        start, stop, keep = cut["start"][mine], cut["stop"][mine], cut["keep_start"][mine]
        assert (stop - start <= max_length).all() and (stop - start > 0).all()
        # Kept ranges tile the document in order: every row once.
        assert keep[0] == 0 and stop[-1] == n
        np.testing.assert_array_equal(keep[1:], stop[:-1])
        # Each later window carries exactly `stride` tokens of left context, and reads a
        # full max_length unless it is the last.
        np.testing.assert_array_equal(keep[1:] - start[1:], stride)
        assert (stop[:-1] - start[:-1] == max_length).all()
        if n <= max_length:
            assert len(mine) == 1


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="stride"):
        long_document_windows(np.array([100]), 10, 10)


def long_documents(demo_dir, path, tokenizer):
    """Documents of 5 to ~400 tokens, made by joining demo corpus texts."""
    texts = [json.loads(line)["text"] for line in (demo_dir / "corpus.jsonl").open()][:120]
    docs, i = [], 0
    for size in [1, 6, 1, 2, 12, 1, 3, 1, 9, 1, 1, 4]:
        docs.append("\n\n".join(texts[i : i + size]))
        i += size
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs, [tokenizer(d)["input_ids"] for d in docs]


def windowed_reference(model, ids: list[int], max_length: int, stride: int):
    """The teacher's logits for one document, window by window, straight from transformers."""
    import torch

    rows, start = [], 0
    while True:
        stop = min(start + max_length, len(ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:stop]])).logits[0]
        first = 0 if start == 0 else stride  # earlier rows came from the previous window
        rows.append(logits[first:])
        if stop == len(ids):
            return torch.cat(rows)
        start += max_length - stride


@pytest.mark.slow
def test_long_documents_are_kept_whole_and_match_the_windowed_forward(workflow, demo_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    docs, token_ids = long_documents(demo_dir, tmp_path / "long.jsonl", tokenizer)
    max_length, stride = 64, 16
    longest = max(len(ids) for ids in token_ids)
    assert longest > 5 * max_length and min(len(ids) for ids in token_ids) < max_length
    workflow.run(
        "--cores",
        "2",
        config={
            "dataset": {"path": str(tmp_path / "long.jsonl")},
            "tokenize": {"max_length": max_length, "overflow": "split", "stride": stride},
            "teacher": {"dtype": "float32"},
            "storage": {"value_dtype": "float32"},
            "num_shards": 2,
            "generation": {"top_k": 8, "batch_tokens": 256},
        },
    )
    store = LogitStore(workflow.path("results/demo"))
    manifest = workflow.manifest()
    # One sample per document, whatever its length: windows are generate's inner detail.
    assert len(store) == len(token_ids) == manifest["num_samples"]
    assert store.num_tokens == sum(len(ids) for ids in token_ids)
    assert manifest["truncated_samples"] == 0
    assert manifest["split_samples"] == sum(len(ids) > max_length for ids in token_ids) > 3

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "teacher", dtype=torch.float32).eval()
    for i, ids in enumerate(token_ids):
        rec = store.by_sample_id(i)
        np.testing.assert_array_equal(rec["input_ids"], ids)
        if len(ids) <= max_length and i % 3:
            continue  # a few short ones are enough
        expected = windowed_reference(model, ids, max_length, stride)
        assert expected.shape[0] == len(ids)
        np.testing.assert_allclose(
            rec["logsumexp"], torch.logsumexp(expected, -1).numpy(), atol=1e-4, rtol=1e-5
        )
        np.testing.assert_allclose(
            rec["topk_logits"], torch.topk(expected, 8, -1).values.numpy(), atol=1e-4, rtol=1e-5
        )
        # The next token's log-probability from the same window's row, the window's last
        # row included (its next token is read by the next window); NaN at the end.
        logprobs = torch.log_softmax(expected, -1)[torch.arange(len(ids) - 1), ids[1:]]
        assert np.isnan(rec["target_logprob"][-1])
        np.testing.assert_allclose(
            rec["target_logprob"][:-1], logprobs.numpy(), atol=1e-4, rtol=1e-5
        )
        # Every window's spans refer to the one text of the document.
        data = rec["text"].encode()
        assert rec["text"] == docs[i] and rec["token_offsets"][-1, 1] == len(data)
        decoded = b"".join(data[a:b] for a, b in rec["token_offsets"])
        assert decoded == data
    # Windows are not a whole-document forward: the rows after the first window differ.
    ids = max(token_ids, key=len)
    with torch.no_grad():
        whole = model(torch.tensor([ids])).logits[0]
    rec = store.by_sample_id(token_ids.index(ids))
    assert not np.allclose(
        rec["logsumexp"][max_length:], torch.logsumexp(whole, -1)[max_length:], atol=1e-3
    )
