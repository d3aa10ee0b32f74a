"""An out-of-memory batch is retried as two halves; a single sample that does not fit
is one clear line. Runs the real demo teacher through the real top-k head; only the
out-of-memory error itself is raised by a wrapper, as CUDA would raise it."""

import logging

import numpy as np
import pytest
import torch

from teacher_logits.errors import TeacherError
from teacher_logits.generation.compute import compute_window
from teacher_logits.generation.teacher import TopKHead, load_teacher

BATCH_TOKENS = 2048


class OutOfMemoryAbove:
    """The real head, failing as CUDA does on a padded batch of more than ``limit`` positions."""

    def __init__(self, head: TopKHead, limit: int):
        self.head, self.limit = head, limit
        self.top_k = head.top_k

    def __call__(self, input_ids, attention_mask):
        if input_ids.numel() > self.limit:
            raise torch.OutOfMemoryError(f"{input_ids.numel()} positions > {self.limit}")
        return self.head(input_ids, attention_mask)


@pytest.fixture(scope="module")
def float32_head(demo_dir):
    # float32 on purpose: a batch split changes which rows are padded together, and so
    # the blocking of every matmul and attention reduction. In float32 that moves a row
    # by a few ulps (relative ~1e-6 per op, two layers here), far below the bounds
    # below. In bfloat16 every layer's output is rounded to 8 mantissa bits, so the same
    # reordering can flip a rounding and move a logit or an entropy by whole bfloat16
    # ulps (0.09 on an entropy of 2.5 was seen on one CPU): a bound there would depend on
    # the machine's kernels, not on the code under test.
    torch.set_num_threads(2)
    model = load_teacher(str(demo_dir / "teacher"), dtype="float32")
    return TopKHead(model, top_k=16)


@pytest.fixture(scope="module")
def samples(demo_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    texts = [line for line in (demo_dir / "corpus.jsonl").read_text().splitlines()[:40]]
    ids = [np.asarray(tokenizer(t)["input_ids"][:128], dtype=np.int32) for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    return np.concatenate(ids), offsets


def test_out_of_memory_batches_are_split_and_logged(float32_head, samples, caplog):
    input_ids, offsets = samples
    whole = compute_window(float32_head, input_ids, offsets, BATCH_TOKENS, pad_id=0)
    with caplog.at_level(logging.WARNING, logger="generate"):
        split = compute_window(
            OutOfMemoryAbove(float32_head, 300), input_ids, offsets, BATCH_TOKENS, pad_id=0
        )
    assert "out of memory on a batch of" in caplog.text
    assert "retrying it as two halves" in caplog.text
    # Every row is there, in its sample's place: float32 bounds (see float32_head).
    for name in ("logsumexp", "entropy", "topk_logits"):
        np.testing.assert_allclose(split[name], whole[name], rtol=1e-4, atol=1e-4, err_msg=name)
    # Ids agree wherever the teacher's ranking is not a near tie (gap above the bound).
    gaps = np.abs(np.diff(whole["topk_logits"], axis=1))
    clear = (
        np.concatenate([gaps[:, :1], np.minimum(gaps[:, 1:], gaps[:, :-1]), gaps[:, -1:]], axis=1)
        > 1e-3
    )
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(split["topk_ids"][clear], whole["topk_ids"][clear])


def test_a_sample_too_big_for_memory_is_one_clear_error(float32_head, samples):
    input_ids, offsets = samples
    with pytest.raises(TeacherError) as error:
        compute_window(OutOfMemoryAbove(float32_head, 4), input_ids, offsets, BATCH_TOKENS, 0)
    message = str(error.value)
    assert "out of memory on a single sample" in message and "tokenize.max_length" in message
    assert "\n" not in message
