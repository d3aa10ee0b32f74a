"""The cross-tokenizer fields: the text the teacher read, each token's byte span in it,
and ``target_logprob``; each checked against an independent computation (the tokenizer's
own decoding, the teacher's own forward), and validation refusing bad ones."""

from __future__ import annotations

import numpy as np
import pytest
from test_prepare_and_teacher import _tiny_model

from teacher_logits.errors import ShardError, TeacherError
from teacher_logits.store.reader import read_sample
from teacher_logits.token_offsets import TokenOffsets
from teacher_logits.tokenization import Tokenization

import test_shard_format
from test_shard_format import Data, make_data, validate

TEXTS = [
    "Héllo wörld 😀 and ç.",
    "plain ascii text, twice: plain ascii text",
    "日本語のテキスト ünd  spaces\n\nnew lines",
]


def assert_spans_slice_the_decoded_tokens(tokenizer, text: str, ids, spans) -> None:
    """Independent of how spans were made: the tokens' own bytes, decoded one by one as
    the tokenizer's byte-level alphabet says, are the text's bytes at their spans; a
    token added without text (BOS) has an empty span."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    data = text.encode()
    specials = set(tokenizer.all_special_ids)
    assert (np.diff(spans[:, 0]) >= 0).all() and (spans[:, 0] <= spans[:, 1]).all()
    for token_id, (start, end) in zip(ids, spans):
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if int(token_id) in specials and start == end:
            continue
        assert data[start:end] == bytes(to_byte[c] for c in token), (token, start, end)


def test_fast_offsets_slice_the_text_into_each_tokens_bytes(demo_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    work = Tokenization(tokenizer, 1000, "truncate", offsets=TokenOffsets(tokenizer))
    out = work.batch(0, TEXTS)
    assert out["texts"] == TEXTS
    spans = np.split(out["token_offsets"], np.cumsum(out["lengths"])[:-1])
    ids = np.split(out["input_ids"], np.cumsum(out["lengths"])[:-1])
    for text, sample_ids, sample_spans in zip(TEXTS, ids, spans):
        assert sample_ids[0] == tokenizer.bos_token_id and tuple(sample_spans[0]) == (0, 0)
        assert sample_spans[-1, 1] == len(text.encode())  # the tokens tile the whole text
        assert_spans_slice_the_decoded_tokens(tokenizer, text, sample_ids, sample_spans)
    # Truncated: the text kept is the start its tokens cover, to a whole character.
    short = Tokenization(tokenizer, 6, "truncate", offsets=TokenOffsets(tokenizer))
    out = short.batch(0, TEXTS[:1])
    assert len(out["input_ids"]) == 6 and TEXTS[0].startswith(out["texts"][0])
    assert out["token_offsets"][-1, 1] <= len(out["texts"][0].encode())
    assert_spans_slice_the_decoded_tokens(
        tokenizer, TEXTS[0], out["input_ids"], out["token_offsets"]
    )


def char_tokenizer(lossy: bool = False):
    """A slow (pure Python) tokenizer built here, without an offset mapping: one token per
    character, a BOS in front; ``lossy`` decodes every letter in lower case."""
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self.vocab = {"<s>": 0, "<unk>": 1}
            for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,é😀":
                self.vocab.setdefault(c, len(self.vocab))
            self.inverse = {i: c for c, i in self.vocab.items()}
            super().__init__(bos_token="<s>", unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 1)

        def _convert_id_to_token(self, index):
            token = self.inverse.get(index, "<unk>")
            return token.lower() if lossy and len(token) == 1 else token

        def build_inputs_with_special_tokens(self, ids, pair=None):
            return [0, *ids]

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

    return CharTokenizer()


def test_a_slow_tokenizer_gets_offsets_by_decoding_or_one_line_naming_it():
    tokenizer = char_tokenizer()
    assert not tokenizer.is_fast
    text = "Héllo 😀."
    work = Tokenization(tokenizer, 100, "truncate", offsets=TokenOffsets(tokenizer))
    out = work.batch(0, [text])
    data = text.encode()
    spans = out["token_offsets"]
    assert tuple(spans[0]) == (0, 0)  # the BOS the tokenizer added
    pieces = [data[a:b].decode() for a, b in spans[1:]]
    assert pieces == [tokenizer.decode([int(i)]) for i in out["input_ids"][1:]] == list(text)
    lossy = Tokenization(tokenizer, 100, "truncate", offsets=TokenOffsets(char_tokenizer(True)))
    with pytest.raises(TeacherError) as caught:
        lossy.batch(0, [text])
    message = str(caught.value)
    assert "\n" not in message and "CharTokenizer" in message
    assert "token 1 (id" in message and "cross_tokenizer_fields: false" in message


# --- target_logprob against the teacher's own forward ----------------------------------


def test_target_logprob_is_the_teachers_log_softmax_of_the_next_token_across_windows():
    """A float32 teacher: target_logprob equals log_softmax(model(window).logits)[t, ids[t+1]]
    within 1e-5 (the head's logits equal the forward's bit for bit; only the order of
    float32 sums in the logsumexp differs), and NaN exactly on each sample's last row.
    A window's last kept row predicts the document's next token, read by the next window."""
    import torch

    from teacher_logits.generation.batching import long_document_windows
    from teacher_logits.generation.compute import compute_window_split
    from teacher_logits.generation.teacher import TopKHead

    model = _tiny_model("llama")
    head = TopKHead(model, top_k=4, chunk_bytes=4 * 300 * 4)
    rng = np.random.default_rng(0)
    lengths = np.array([7, 40, 1, 12])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, 300, int(offsets[-1])).astype(np.int32)
    rows = compute_window_split(head, ids, offsets, 64, 0, 16, 4, with_targets=True)
    expected = np.full(len(ids), np.nan, dtype=np.float32)
    cut = long_document_windows(lengths, 16, 4)
    for s, a, b, keep in zip(cut["sample"], cut["start"], cut["stop"], cut["keep_start"]):
        window = torch.from_numpy(ids[offsets[s] + a : offsets[s] + b].astype(np.int64))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(window[None]).logits[0].float(), -1).numpy()
        for t in range(keep, b):
            if t + 1 < lengths[s]:
                expected[offsets[s] + t] = logprobs[t - a, ids[offsets[s] + t + 1]]
    assert np.isnan(expected).sum() == len(lengths) and len(cut["sample"]) > len(lengths)
    np.testing.assert_array_equal(np.isnan(rows["target_logprob"]), np.isnan(expected))
    np.testing.assert_allclose(rows["target_logprob"], expected, atol=1e-5, rtol=1e-5)
    # Without targets asked for, nothing is computed.
    assert "target_logprob" not in compute_window_split(head, ids, offsets, 64, 0, 16, 4)


def test_vocabulary_slices_merge_the_target_logit_as_one_pass_would():
    import torch

    from teacher_logits.generation.topk import Reduction, merge_slices, reduce_rows

    logits = torch.randn(9, 100) * 4
    targets = torch.tensor([0, 5, 49, 50, 51, 99, -1, 73, 25])
    reduction = Reduction(top_k=4, chunk_rows=3)
    whole = reduce_rows(logits.clone(), None, reduction, "cpu", targets=targets)
    slices = [
        reduce_rows(logits[:, a:b].clone(), None, reduction, "cpu", id_offset=a, targets=targets)
        for a, b in ((0, 30), (30, 50), (50, 100))
    ]
    merged = merge_slices(slices, 4)
    picked = logits[torch.arange(9), targets.clamp(min=0)]
    expected = torch.where(targets >= 0, picked, torch.tensor(-torch.inf))
    assert torch.equal(whole.target_logit, expected) and torch.equal(merged.target_logit, expected)


# --- shards: write, read back, validate ---------------------------------------------------


def cross_data(seed: int = 0):
    """Test data with texts, spans and target_logprob consistent with its top-k."""
    data = make_data(seed)
    texts = [("é" * int(n))[: int(n)] for n in data.lengths]  # 2 bytes per token
    text_bytes = np.frombuffer("".join(texts).encode(), dtype=np.uint8)
    text_offsets = np.concatenate([[0], np.cumsum([len(t.encode()) for t in texts])])
    starts = np.concatenate([np.arange(n) * 2 for n in data.lengths])
    spans = np.stack([starts, starts + 2], axis=1).astype(np.int32)
    spans[data.offsets[:-1]] = 0  # a BOS-like first token: an empty span at 0
    target = np.full(len(data.input_ids), np.nan, dtype=np.float32)
    for t in range(len(target)):
        if t + 1 not in data.offsets:
            nxt = data.input_ids[t + 1]
            hit = np.flatnonzero(data.topk_ids[t] == nxt)
            value = data.topk_logits[t, hit[0]] if len(hit) else data.topk_logits[t, -1] - 1
            target[t] = np.float32(value) - data.logsumexp[t]
    return data, texts, (text_bytes, text_offsets), spans, target


def write_cross_shard(path, seed=0, damage=None):
    data, texts, text, spans, target = cross_data(seed)
    if damage:
        spans, target = damage(spans.copy(), target.copy())
    arrays = test_shard_format.arrays

    def with_cross(d: Data, r0: int, r1: int) -> dict:
        return {**arrays(d, r0, r1), "token_offsets": spans[r0:r1], "target_logprob": target[r0:r1]}

    test_shard_format.arrays = with_cross
    try:
        test_shard_format.write_shard(path, data, text=text)
    finally:
        test_shard_format.arrays = arrays
    return data, texts, spans, target


def test_a_shard_with_the_fields_validates_and_reads_them_back(tmp_path):
    import h5py

    path = tmp_path / "shard.h5"
    data, texts, spans, target = write_cross_shard(path)
    validate(path, data)
    with h5py.File(path, "r") as handle:
        for s in range(len(texts)):
            rec = read_sample(handle, s)
            r0, r1 = data.offsets[s], data.offsets[s + 1]
            assert rec["text"] == texts[s]
            np.testing.assert_array_equal(rec["token_offsets"], spans[r0:r1])
            np.testing.assert_array_equal(rec["target_logprob"], target[r0:r1])
            assert rec["target_logprob"].dtype == np.float32
    # A shard without them (made before them, or with the setting off) reads without them.
    plain = test_shard_format.write_shard(tmp_path / "plain.h5", data)
    validate(plain, data)
    with h5py.File(plain, "r") as handle:
        assert not {"text", "token_offsets", "target_logprob"} & set(read_sample(handle, 0))


def _inner_token() -> int:
    """A token that is not its sample's first nor its last."""
    offsets = make_data(0).offsets
    return next(t for t in range(2, offsets[-1]) if t not in offsets and t + 1 not in offsets)


def _backwards(spans, target):
    t = _inner_token()
    spans[t] = spans[t - 1, 0] - 1, spans[t - 1, 0]
    return spans, target


def _outside(spans, target):
    spans[_inner_token(), 1] = 10_000
    return spans, target


def _positive(spans, target):
    target[_inner_token()] = 0.5
    return spans, target


def _off_topk(spans, target):
    target[~np.isnan(target)] -= 0.25  # rows whose next token is in the top-k now differ
    return spans, target


def _nan_inside(spans, target):
    target[_inner_token()] = np.nan
    return spans, target


@pytest.mark.parametrize(
    "damage,message",
    [
        (_backwards, "token_offsets go backwards"),
        (_outside, "not a span inside its text"),
        (_positive, "target_logprob above 0"),
        (_off_topk, "its next token is top-k rank"),
        (_nan_inside, "NaN where a next token exists"),
    ],
)
def test_validation_refuses_bad_offsets_and_target_logprobs(tmp_path, damage, message):
    path = tmp_path / "shard.h5"
    data, *_ = write_cross_shard(path, damage=damage)
    with pytest.raises(ShardError, match=message):
        validate(path, data)


def test_the_writer_refuses_rows_without_the_fields_it_was_opened_for(tmp_path):
    data, texts, text, spans, target = cross_data()
    with pytest.raises(ShardError, match="rows without token_offsets and target_logprob"):
        test_shard_format.write_shard(tmp_path / "shard.h5", data, text=text)


def test_the_disk_estimate_counts_the_fields_where_the_plan_made_them():
    from teacher_logits.row_bytes import (
        CROSS_FIELD_BYTES,
        part_bytes_per_token,
        planned_row,
        uncompressed_bytes_per_token,
    )

    base = uncompressed_bytes_per_token(64, "float16", True)
    assert planned_row({"settings": {}})["cross_fields"] is False  # plans from before them
    row = planned_row({"settings": {}, "cross_tokenizer_fields": True})
    assert uncompressed_bytes_per_token(64, "float16", True, **row) == base + CROSS_FIELD_BYTES
    # A resume part holds target_logprob only: the text and spans are prepare's.
    assert part_bytes_per_token(64, "float16", True, **row) == base - 4 + 4
