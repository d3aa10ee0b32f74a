"""Cross-tokenizer distillation: byte alignment, the vocabulary map and the losses, each
against a slow reference written with plain loops (float64), on real tokenizers built
offline with the ``tokenizers`` library."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import CanineTokenizer, PreTrainedTokenizerFast

from teacher_logits.demo import build_tokenizer
from teacher_logits.errors import TrainingInputError
from teacher_logits.token_offsets import TokenOffsets
from teacher_logits.training.cross_tokenizer import (
    align,
    build_vocab_map,
    collate_cross_tokenizer,
    cross_tokenizer_loss,
)

CORPUS = [
    f"the cat {i} sat on the mat, café au lait {i * 7}; 日本語 😀 is fine. Ünïcödé {i % 5}"
    for i in range(200)
]
OTHER = [f"a dog named Rex {i} ran to the park, naïve 日本 {i * 3}!" for i in range(200)]
TEXTS = [
    "the cat sat on the mat, café 日本 😀!",
    "a dog ran to the park; naïve résumé 日本語 number 42",
    "Ünïcödé 😀😀 is fine.",
]


def _byte_level_student(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _sentencepiece_like(texts, normalizer=None):
    """Metaspace BPE with byte fallback, BOS and EOS added, as Llama 2 and Mistral have."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, show_progress=False)
    trained.train_from_iterator(texts, trainer=trainer)
    model = trained.to_str()
    import json

    spec = json.loads(model)["model"]
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    for piece in spec["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture(scope="module")
def teacher():
    tok = build_tokenizer(CORPUS, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


@pytest.fixture(scope="module")
def students():
    return {
        "bpe": _byte_level_student(OTHER + CORPUS[:20], 300),
        "bytes": _byte_level_student(["x"], 258),
        "sentencepiece": _sentencepiece_like(OTHER + CORPUS[:50]),
    }


def record(tokenizer, text, sample_id=0, top_k=8, seed=0, loss_mask=None, special=True):
    """A store record as generation writes it, from a random but consistent teacher."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    spans = TokenOffsets(tokenizer).from_char_offsets(text, ids, enc["offset_mapping"])
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(len(ids), len(tokenizer)))
    lse = np.logaddexp.reduce(logits, axis=1)
    lse_2 = np.logaddexp.reduce(logits / 2.0, axis=1)
    top = np.argsort(-logits, axis=1)[:, :top_k]
    target = np.full(len(ids), np.nan)
    target[:-1] = logits[np.arange(len(ids) - 1), ids[1:]] - lse[:-1]
    rec = {
        "sample_id": sample_id,
        "input_ids": ids.astype(np.int32),
        "topk_ids": top.astype(np.int32),
        "topk_logits": np.take_along_axis(logits, top, 1).astype(np.float32),
        "logsumexp": lse.astype(np.float32),
        "logsumexp_t": {1.0: lse.astype(np.float32), 2.0: lse_2.astype(np.float32)},
        "text": text,
        "token_offsets": spans,
        "target_logprob": target.astype(np.float32),
    }
    if loss_mask is not None:
        rec["loss_mask"] = loss_mask
    return rec


# ---------------------------------------------------------------- alignment


def reference_align(teacher_spans, student_spans):
    """Byte by byte: who owns each byte, the cuts of each side, their common ones."""

    def owners(spans):
        cursor, owned, unsure = 0, [], set()
        for start, end in spans:
            if end <= start:
                owned.append(None)
            elif end > cursor:
                if start < cursor:
                    unsure.add(cursor)
                owned.append((cursor, end))
                cursor = end
            else:
                owned.append((cursor, cursor))
        by_byte = {}
        for i, piece in enumerate(owned):
            if piece:
                for x in range(*piece):
                    by_byte[x] = i
        cuts = {0, cursor} | {p for p in range(1, cursor) if by_byte[p - 1] != by_byte[p]}
        return owned, cuts - unsure

    (t_owned, t_cuts), (s_owned, s_cuts) = owners(teacher_spans), owners(student_spans)
    bounds = sorted(t_cuts & s_cuts)
    chunks = list(zip(bounds, bounds[1:]))

    def chunk_of(owned):
        out = []
        for piece in owned:
            last = None if piece is None else piece[1] - 1
            out.append(next((c for c, (a, b) in enumerate(chunks) if piece and a <= last < b), -1))
        return out

    return bounds, chunk_of(t_owned), chunk_of(s_owned)


def random_spans(rng, size):
    inner = rng.integers(1, size, rng.integers(0, size)).tolist() if size > 1 else []
    cuts = sorted(set(inner) | {0, size})
    spans = [[a, b] for a, b in zip(cuts, cuts[1:])]
    if rng.random() < 0.5:
        spans.insert(0, [0, 0])  # BOS
    for i in range(1, len(spans)):
        if rng.random() < 0.1 and spans[i][0] > 0:  # pieces of one character
            spans[i][0] = max(0, spans[i][0] - int(rng.integers(1, 3)))
    if rng.random() < 0.3:
        spans.append([size, size])  # EOS
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def test_alignment_matches_the_byte_by_byte_reference_on_random_tokenizations():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = int(rng.integers(1, 30))
        teacher_spans, student_spans = random_spans(rng, size), random_spans(rng, size)
        got = align(teacher_spans, student_spans)
        bounds, teacher_chunk, student_chunk = reference_align(teacher_spans, student_spans)
        assert got.bounds.tolist() == bounds
        assert got.teacher_chunk.tolist() == teacher_chunk
        assert got.student_chunk.tolist() == student_chunk
        for c in range(got.num_chunks):  # each chunk opens with the token owning its first byte
            assert teacher_chunk[got.teacher_first[c]] == c
            assert student_chunk[got.student_first[c]] == c


@pytest.mark.parametrize(
    "teacher_spans, student_spans, bounds, teacher_chunk, student_chunk",
    [
        # merge: "hello" is one teacher token and two student tokens
        ([[0, 5]], [[0, 3], [3, 5]], [0, 5], [0], [0, 0]),
        # split: " world" split by the teacher, one student token
        ([[0, 2], [2, 5], [5, 11]], [[0, 5], [5, 11]], [0, 5, 11], [0, 0, 1], [0, 1]),
        # "é" (2 bytes): one teacher token, one student token per byte
        ([[0, 1], [1, 3]], [[0, 1], [1, 2], [2, 3]], [0, 1, 3], [0, 1], [0, 1, 1]),
        # "日本" (3 + 3 bytes) against "日" "本"
        ([[0, 6]], [[0, 3], [3, 6]], [0, 6], [0], [0, 0]),
        # an emoji in two pieces whose byte lengths were not known: no cut inside it
        ([[0, 1], [1, 5]], [[0, 1], [1, 5], [1, 5]], [0, 1, 5], [0, 1], [0, 1, 1]),
        # "xé" then "é"'s second byte + "y", as character spans: the cut at 3 is not real
        ([[0, 1], [1, 3], [3, 4]], [[0, 3], [1, 4]], [0, 4], [0, 0, 0], [0, 0]),
        # BOS on the teacher's side only, EOS on the student's
        ([[0, 0], [0, 2], [2, 4]], [[0, 4], [4, 4]], [0, 4], [-1, 0, 0], [0, -1]),
        # trimmed offsets: the student's spans leave out the space (byte 5)
        ([[0, 5], [5, 11]], [[0, 5], [6, 11]], [0, 5, 11], [0, 1], [0, 1]),
        # the student stops early (cropped): bytes past its last cut are in no chunk
        ([[0, 2], [2, 4], [4, 6]], [[0, 2], [2, 3]], [0, 2], [0, -1, -1], [0, -1]),
        # nothing at all
        ([], [], [0], [], []),
    ],
)
def test_alignment_hand_built_cases(
    teacher_spans, student_spans, bounds, teacher_chunk, student_chunk
):
    got = align(teacher_spans, student_spans)
    assert got.bounds.tolist() == bounds
    assert got.teacher_chunk.tolist() == teacher_chunk
    assert got.student_chunk.tolist() == student_chunk
    assert reference_align(teacher_spans, student_spans) == (bounds, teacher_chunk, student_chunk)


def _tokens_text(tokenizer, ids) -> str:
    return tokenizer.backend_tokenizer.decoder.decode(tokenizer.convert_ids_to_tokens(ids))


def _gpt2_alphabet() -> dict:
    """GPT-2's bytes_to_unicode, reversed: the character standing for each byte."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_bytes(tokenizer, ids) -> bytes:
    table = _gpt2_alphabet()
    return b"".join(bytes(table[ch] for ch in t) for t in tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_collated_chunks_hold_the_same_text_on_both_sides(teacher, students, name):
    student = students[name]
    records = [record(teacher, text, i) for i, text in enumerate(TEXTS)]
    batch = collate_cross_tokenizer(records, student, build_vocab_map(teacher, student))
    checked = 0
    for b, rec in enumerate(records):
        data = rec["text"].encode()
        t_ids = rec["input_ids"].tolist()
        s_ids = batch["input_ids"][b][batch["attention_mask"][b]].tolist()
        t_rows, s_rows = batch["teacher_row_chunk"][b], batch["student_row_chunk"][b]
        pieces = {}
        for c in set(t_rows.tolist()) - {-1}:
            teacher_tokens = [t_ids[t + 1] for t in np.flatnonzero(t_rows == c)]
            student_tokens = [s_ids[t + 1] for t in np.flatnonzero(s_rows == c)]
            piece = _byte_level_bytes(teacher, teacher_tokens)
            assert piece == _byte_level_bytes(student, student_tokens)
            assert len(piece) == int(batch["chunk_bytes"][c])
            pieces[c] = piece
        # In order, the chunks are the text after its first chunk, which the student
        # (no BOS) cannot score.
        joined = b"".join(pieces[c] for c in sorted(pieces))
        assert data.endswith(joined) and len(joined) >= len(data) - 4
        assert int(batch["dropped_bytes"]["no_prediction"][b]) == len(data) - len(joined)
        checked += len(pieces)
    assert checked == len(batch["chunk_bytes"]) and checked > 20
    assert int(batch["dropped_bytes"]["round_trip"].sum()) == 0


def test_every_byte_is_kept_or_counted_with_its_reason(teacher, students):
    student = students["bytes"]
    records = [record(teacher, text, i) for i, text in enumerate(TEXTS)]
    vocab_map = build_vocab_map(teacher, student)
    batch = collate_cross_tokenizer(records, student, vocab_map, max_length=20, max_chunk_bytes=3)
    assert batch["input_ids"].shape[1] == 20
    dropped = batch["dropped_bytes"]
    assert all(int(dropped[reason].sum()) > 0 for reason in ("past_end", "no_prediction"))
    kept = torch.zeros(len(records), dtype=torch.int64)
    for b in range(len(records)):
        kept[b] = sum(
            int(batch["chunk_bytes"][c]) for c in set(batch["student_row_chunk"][b].tolist()) - {-1}
        )
    assert torch.equal(kept + sum(dropped.values()), batch["text_bytes"])


def test_sentencepiece_student_dummy_prefix_bos_and_eos(teacher, students):
    student = students["sentencepiece"]
    text = "Zq the cat sat, naïve 日本!"
    batch = collate_cross_tokenizer(
        [record(teacher, text)], student, build_vocab_map(teacher, student)
    )
    tokens = student.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    # A lone dummy prefix, its span on the "Z" the byte fallback spells.
    assert tokens[:4] == ["<s>", "▁", "<0x5A>", "<0x71>"] and tokens[-1] == "</s>"
    # Every byte is aligned: BOS on both sides, the dummy "▁" and EOS lie in no chunk.
    assert int(batch["chunk_bytes"].sum()) == len(text.encode())
    assert all(int(v.sum()) == 0 for v in batch["dropped_bytes"].values())
    rows = batch["student_row_chunk"][0].tolist()
    assert rows[0] == -1 and rows[-2] == -1  # BOS -> "▁" and the last byte -> "</s>"
    assert batch["labels"][0, -2] == student.eos_token_id  # still trained by the CE


def test_chat_template_text_trains_the_assistant_bytes_only(teacher, students):
    student = students["bpe"]
    messages = [
        {"role": "user", "content": "café?"},
        {"role": "assistant", "content": "日本 😀 yes"},
    ]
    teacher.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    text = teacher.apply_chat_template(messages, tokenize=False)
    answer = text.index("日本")
    answer = (len(text[:answer].encode()), len(text[: text.index("<|im_end|>", answer)].encode()))
    rec = record(teacher, text, special=False)
    starts = rec["token_offsets"][:, 0]
    rec["loss_mask"] = ((starts >= answer[0]) & (starts < answer[1])).astype(np.uint8)
    batch = collate_cross_tokenizer(
        [rec], student, build_vocab_map(teacher, student), add_special_tokens=False
    )
    ids = batch["input_ids"][0].tolist()
    trained = [ids[t + 1] for t in np.flatnonzero(batch["labels"][0] != -100)]
    assert _tokens_text(student, trained) == "日本 😀 yes"
    # The specials the teacher read as one token each are text to this student.
    assert "<|im_start|>" in _tokens_text(student, ids)
    assert int(batch["chunk_bytes"].sum()) == len("日本 😀 yes".encode())
    assert len(batch["pair_index"]) == len(batch["chunk_bytes"])


# ---------------------------------------------------------------- vocabulary map


def test_vocab_map_pairs_ids_with_identical_bytes(teacher, students):
    for student in students.values():
        vocab_map = build_vocab_map(teacher, student)
        mapping = vocab_map.teacher_to_student
        mapped = mapping[mapping >= 0]
        assert len(set(mapped.tolist())) == len(mapped)  # injective
        for teacher_id, student_id in enumerate(mapping.tolist()):
            t_text = _tokens_text(teacher, [teacher_id])
            if teacher_id in teacher.all_special_ids:
                assert student_id == -1
            elif student_id >= 0:
                assert t_text.replace("▁", " ") == student.convert_ids_to_tokens(
                    student_id
                ).replace("▁", " ").replace("Ġ", " ") or t_text == _tokens_text(
                    student, [student_id]
                )
    # " cat" is "Ġcat" to the teacher and "▁cat" to the SentencePiece-like student.
    sp = students["sentencepiece"]
    vocab_map = build_vocab_map(teacher, sp)
    cat = teacher.convert_tokens_to_ids("Ġcat")
    assert sp.convert_ids_to_tokens(int(vocab_map.teacher_to_student[cat])) == "▁cat"
    # The byte-level student has every single byte.
    byte_map = build_vocab_map(teacher, students["bytes"])
    assert byte_map.matched >= 256 - 2  # the teacher has every byte, but not the specials


def test_a_token_added_to_the_student_after_a_first_map_counts_in_the_next(teacher):
    student = _byte_level_student(["x"], 258)
    before = build_vocab_map(teacher, student).matched
    student.add_tokens([" cat"])
    vocab_map = build_vocab_map(teacher, student)
    assert vocab_map.matched == before + 1
    cat = teacher.convert_tokens_to_ids("Ġcat")
    assert int(vocab_map.teacher_to_student[cat]) == student.convert_tokens_to_ids(" cat")


# ---------------------------------------------------------------- losses


def reference_losses(records, teacher, student, logits, *, temperature, max_chunk_bytes=128):
    """(chunk, distribution, ce) with loops in float64, from the records alone. Both
    tokenizers are byte-level: equal token strings are equal bytes."""
    specials = set(student.all_special_ids)
    student_of = {
        t: i
        for i, t in enumerate(student.convert_ids_to_tokens(list(range(len(student)))))
        if i not in specials
    }
    teacher_tokens = teacher.convert_ids_to_tokens(list(range(len(teacher))))
    chunk_terms, pair_terms, ce_terms = [], [], []
    for b, rec in enumerate(records):
        text = rec["text"]
        enc = student(text, return_offsets_mapping=True)
        s_ids = enc["input_ids"]
        s_spans = TokenOffsets(student).from_char_offsets(text, s_ids, enc["offset_mapping"])
        bounds, t_chunk, s_chunk = reference_align(rec["token_offsets"].tolist(), s_spans.tolist())
        row = logits[b].double()

        def student_logp(r, token, temp=1.0, row=row):
            values = (row[r] / temp).tolist()
            top = max(values)
            return values[token] / 1.0 - top - math.log(sum(math.exp(v - top) for v in values))

        for r in range(len(s_ids) - 1):
            ce_terms.append(-student_logp(r, s_ids[r + 1]))
        for c, (a, z) in enumerate(zip(bounds, bounds[1:])):
            t_tokens = [i for i, x in enumerate(t_chunk) if x == c]
            s_tokens = [j for j, x in enumerate(s_chunk) if x == c]
            if min(t_tokens) < 1 or min(s_tokens) < 1:
                continue
            # The distribution at the chunk's first byte.
            t_row, s_row = t_tokens[0] - 1, s_tokens[0] - 1
            lse_t = rec["logsumexp_t"][temperature][t_row]
            tail_p, kl, taken = 1.0, 0.0, []
            for tid, logit in zip(rec["topk_ids"][t_row], rec["topk_logits"][t_row]):
                token = teacher_tokens[int(tid)]
                if int(tid) in teacher.all_special_ids or token not in student_of:
                    continue
                sid = student_of[token]
                p = math.exp(float(logit) / temperature - float(lse_t))
                q = math.exp(student_logp(s_row, sid, temperature))
                kl += p * math.log(p / q)
                tail_p -= p
                taken.append(q)
            tail_q = 1.0 - sum(taken)
            kl += tail_p * math.log(tail_p / tail_q) if tail_p > 0 else 0.0
            pair_terms.append(kl)
            if z - a > max_chunk_bytes:
                continue
            teacher_ll = sum(float(rec["target_logprob"][t - 1]) for t in t_tokens)
            student_ll = sum(student_logp(j - 1, s_ids[j]) for j in s_tokens)
            lp, lq = min(teacher_ll / temperature, -1e-6), min(student_ll / temperature, -1e-6)
            p, q = math.exp(lp), math.exp(lq)
            chunk_terms.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    return mean(chunk_terms), mean(pair_terms), mean(ce_terms)


@pytest.mark.parametrize("name", ["bpe", "bytes"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_losses_match_the_slow_reference(teacher, students, name, temperature):
    student = students[name]
    records = [record(teacher, text, i, seed=i) for i, text in enumerate(TEXTS)]
    batch = collate_cross_tokenizer(records, student, build_vocab_map(teacher, student))
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(student), dtype=torch.float64)
    chunk, distribution, ce = reference_losses(
        records, teacher, student, logits, temperature=temperature
    )
    assert chunk > 0 and distribution > 0 and ce > 0

    def loss(kind, ce_weight):
        return float(
            cross_tokenizer_loss(
                logits, batch, loss=kind, ce_weight=ce_weight, temperature=temperature
            )
        )

    assert loss("chunk", 0.0) == pytest.approx(chunk, rel=1e-9)
    assert loss("distribution", 0.0) == pytest.approx(distribution, rel=1e-9)
    assert loss("both", 1.0) == pytest.approx(ce, rel=1e-9)
    assert loss("both", 0.25) == pytest.approx(0.75 * (chunk + distribution) + 0.25 * ce, rel=1e-9)


def test_the_loss_trains_a_student_toward_the_teacher(teacher, students):
    student = students["bpe"]
    records = [record(teacher, text, i, seed=i) for i, text in enumerate(TEXTS)]
    batch = collate_cross_tokenizer(records, student, build_vocab_map(teacher, student))
    logits = torch.zeros(*batch["input_ids"].shape, len(student), requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        value = cross_tokenizer_loss(logits, batch, loss="both", ce_weight=0.0)
        value.backward()
        assert torch.isfinite(logits.grad).all()
        optimizer.step()
        first = float(value.detach()) if first is None else first
    assert float(value.detach()) < 0.2 * first


# ---------------------------------------------------------------- bad input


def test_a_store_without_the_fields_names_the_setting(teacher, students):
    old = record(teacher, TEXTS[0])
    for name in ("text", "token_offsets", "target_logprob"):
        del old[name]
    with pytest.raises(TrainingInputError) as error:
        collate_cross_tokenizer([old], students["bpe"], build_vocab_map(teacher, students["bpe"]))
    message = str(error.value)
    assert "\n" not in message
    assert "storage.cross_tokenizer_fields: true" in message and "force_regenerate" in message


def test_a_slow_student_tokenizer_is_refused(teacher):
    slow = CanineTokenizer()
    with pytest.raises(TrainingInputError, match="has no offset mapping.*use_fast=True"):
        collate_cross_tokenizer([record(teacher, TEXTS[0])], slow, build_vocab_map(teacher, slow))


def test_damaged_offsets_are_refused(teacher, students):
    rec = record(teacher, TEXTS[0])
    rec["token_offsets"] = rec["token_offsets"] + 100
    with pytest.raises(TrainingInputError, match="outside its .* text bytes.*verify --deep"):
        collate_cross_tokenizer([rec], students["bpe"], build_vocab_map(teacher, students["bpe"]))


def test_text_that_does_not_round_trip_is_left_out(teacher):
    lowercase = _sentencepiece_like(OTHER + CORPUS[:50], normalizer=normalizers.Lowercase())
    text = "the Cat sat on the MAT"
    batch = collate_cross_tokenizer(
        [record(teacher, text)], lowercase, build_vocab_map(teacher, lowercase)
    )
    dropped = int(batch["dropped_bytes"]["round_trip"][0])
    # "Cat" and "MAT" with the space before each: tokens that do not spell the text.
    assert dropped >= len(" Cat MAT") and int(batch["chunk_bytes"].sum()) + dropped == len(text)
    logits = torch.randn(*batch["input_ids"].shape, len(lowercase), requires_grad=True)
    cross_tokenizer_loss(logits, batch, ce_weight=0.0).backward()
    # Rows predicting those tokens get no gradient (ce_weight 0), unless they open a pair.
    pair_rows = set(batch["pair_index"][:, 2].tolist())
    silent = [
        t for t in np.flatnonzero(batch["student_row_chunk"][0] < 0).tolist() if t not in pair_rows
    ]
    assert len(silent) >= 3
    assert all(torch.count_nonzero(logits.grad[0, t]) == 0 for t in silent)


def test_long_stretches_without_a_shared_cut_leave_the_chunk_loss(teacher, students):
    student = students["bpe"]
    records = [record(teacher, text, i) for i, text in enumerate(TEXTS)]
    vocab_map = build_vocab_map(teacher, student)
    full = collate_cross_tokenizer(records, student, vocab_map)
    short = collate_cross_tokenizer(records, student, vocab_map, max_chunk_bytes=3)
    long_bytes = int(full["chunk_bytes"][full["chunk_bytes"] > 3].sum())
    assert long_bytes > 0
    assert int(short["dropped_bytes"]["long_chunk"].sum()) == long_bytes
    assert bool((short["chunk_bytes"] <= 3).all())
    # The distribution loss still sees the start of every chunk.
    assert len(short["pair_index"]) == len(full["pair_index"])


def test_an_empty_sample_has_no_chunk_and_a_zero_loss(teacher, students):
    student = students["bpe"]
    empty = record(teacher, "")
    batch = collate_cross_tokenizer([empty], student, build_vocab_map(teacher, student))
    assert batch["input_ids"].shape[1] == 0 and len(batch["chunk_bytes"]) == 0
    logits = torch.zeros(1, 0, len(student), requires_grad=True)
    value = cross_tokenizer_loss(logits, batch)
    value.backward()
    assert float(value.detach()) == 0.0 and logits.grad is not None
    mixed = collate_cross_tokenizer(
        [empty, record(teacher, TEXTS[0], 1)], student, build_vocab_map(teacher, student)
    )
    assert int(mixed["attention_mask"][0].sum()) == 0 and len(mixed["chunk_bytes"]) > 0
