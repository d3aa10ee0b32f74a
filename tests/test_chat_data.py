"""Chat data: rendering with chat templates, loss masks from rendered offsets, validation,
masked-only storage, and the workflow end to end on a chat dataset."""

import json

import h5py
import numpy as np
import pytest
import yaml

from teacher_logits import LogitStore
from teacher_logits.chat import ChatRenderer, template_text
from teacher_logits.errors import UserError
from teacher_logits.store.format import needed_rows

from conftest import REPO

# ChatML: the role header before the content, <|im_end|> (a stop token) after it.
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# Quite another shape: plain-text headers, trimmed content, a text footer before the eos
# after the assistant turn, system turns in brackets, and a closing line after everything.
QA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}### Question:\n{{ m.content | trim }}\n\n"
    "{% elif m.role == 'assistant' %}### Answer (by the assistant):\n{{ m.content | trim }}"
    "\n--- end of answer ---{{ eos_token }}\n\n"
    "{% else %}[[{{ m.role | upper }}]] {{ m.content }} [[/{{ m.role | upper }}]]\n{% endif %}"
    "{% endfor %}Conversation over."
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "  It is 4. "},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def stops_for(tokenizer, template):
    # ChatML models stop on <|im_end|> (their generation_config lists it); QA on eos.
    return (
        [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if template is CHATML
        else [tokenizer.eos_token_id]
    )


def trained_pieces(tokenizer, ids, mask) -> list[str]:
    """The decoded runs of tokens with mask 1."""
    pieces, run = [], []
    for token, flag in zip(ids, mask):
        if flag:
            run.append(int(token))
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return pieces


@pytest.mark.parametrize(
    "template,expected",
    [
        (CHATML, [" It is 4. <|im_end|>", "6<|im_end|>"]),
        # Text the template puts after the answer, up to its end of turn, is generated too.
        (QA, ["It is 4.\n--- end of answer ---</s>", "6\n--- end of answer ---</s>"]),
    ],
    ids=["chatml", "text-around-turns"],
)
def test_loss_mask_is_the_assistant_turns_with_their_end_of_turn(tokenizer, template, expected):
    renderer = ChatRenderer(tokenizer, template, ["assistant"], stops_for(tokenizer, template))
    [(ids, mask, _, _)] = renderer.encode([0], [CONVERSATION])
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    # The tokens are the rendered text tokenized as it is (its special tokens included).
    assert list(ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert trained_pieces(tokenizer, ids, mask) == expected
    # Headers, prompts and the text after the last turn are never trained on.
    assert mask[0] == 0 and mask[-1] == 0


@pytest.mark.parametrize("template", [CHATML, QA], ids=["chatml", "text-around-turns"])
def test_train_roles_choose_the_turns(tokenizer, template):
    renderer = ChatRenderer(tokenizer, template, ["user", "system"], stops_for(tokenizer, template))
    [(ids, mask, _, _)] = renderer.encode([0], [CONVERSATION])
    pieces = trained_pieces(tokenizer, ids, mask)
    assert any("Be brief." in p for p in pieces)
    assert any("What is 2+2?" in p for p in pieces) and any("And 3+3?" in p for p in pieces)
    assert not any("It is 4" in p for p in pieces)


def test_content_repeated_in_the_template_text_is_located_exactly(tokenizer):
    """A reply that equals template words ('assistant', 'Answer') is not confused with them."""
    conversation = [
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "Answer"},
    ]
    for template, expected in (
        (CHATML, ["Answer<|im_end|>"]),
        (QA, ["Answer\n--- end of answer ---</s>"]),
    ):
        renderer = ChatRenderer(tokenizer, template, ["assistant"], stops_for(tokenizer, template))
        [(ids, mask, _, _)] = renderer.encode([0], [conversation])
        assert trained_pieces(tokenizer, ids, mask) == expected


def test_template_that_rewrites_content(tokenizer):
    # Uppercasing keeps the markers around the content: the mask still lands on it.
    upper = "{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}<|im_end|>{% endfor %}"
    renderer = ChatRenderer(tokenizer, upper, ["assistant"], stops_for(tokenizer, CHATML))
    [(ids, mask, _, _)] = renderer.encode([0], [CONVERSATION[1:3]])
    assert trained_pieces(tokenizer, ids, mask) == [" IT IS 4. <|im_end|>"]
    # A template that cuts content apart leaves nothing to locate: a clear error.
    cutting = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content.split('4')[-1] }}<|im_end|>{% endfor %}"
    )
    renderer = ChatRenderer(tokenizer, cutting, ["assistant"], stops_for(tokenizer, CHATML))
    with pytest.raises(
        UserError, match="dataset row 7: the chat template changes the text of message 1"
    ):
        renderer.encode([7], [CONVERSATION[1:3]])


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"role": "wizard", "content": "hi"}], r"dataset row 3, message 0: unknown role 'wizard'"),
        ([{"role": "user"}], r"dataset row 3, message 0 \(user\): no content"),
        ([{"role": "user", "content": None}], r"message 0 \(user\): no content"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"no content"),
        ("hello", r"dataset row 3: the messages field holds str, not a list"),
        ([["user", "hi"]], r"dataset row 3, message 0: list instead of a \{role, content\}"),
    ],
)
def test_bad_messages_are_clear_errors(tokenizer, messages, match):
    renderer = ChatRenderer(tokenizer, CHATML, ["assistant"], [])
    with pytest.raises(UserError, match=match):
        renderer.encode([3], [messages])


def test_a_tokenizer_without_a_template_needs_one_given(tokenizer, tmp_path):
    assert tokenizer.chat_template is None  # the demo tokenizer has none
    with pytest.raises(
        UserError, match="no chat template; give a Jinja template file as dataset.chat_template"
    ):
        template_text(tokenizer, None)
    path = tmp_path / "t.jinja"
    path.write_text(QA)
    assert template_text(tokenizer, str(path)) == QA


# --- the workflow end to end on chat data -------------------------------------------------


def chat_teacher(demo_dir, out, template=CHATML):
    """A small random Llama whose tokenizer knows ChatML, with its own chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def chat_dataset(demo_dir, path, count=40):
    """Conversations built from the demo corpus: system prompts, several turns, odd spacing."""
    texts = [json.loads(line)["text"] for line in (demo_dir / "corpus.jsonl").open()][: 4 * count]
    rows = []
    for i in range(count):
        turns = [] if i % 3 else [{"role": "system", "content": "You answer about Python."}]
        for j in range(1 + i % 3):
            question, answer = texts[4 * i + 2 * j][:120], texts[4 * i + 2 * j + 1][:200]
            turns += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f" {answer}\n" if j % 2 else answer},
            ]
        rows.append({"messages": turns, "id": i})
    rows[5]["messages"] = []  # dropped and listed, never fatal
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.slow
def test_chat_workflow_loss_mask_and_masked_only_storage(workflow, demo_dir, tmp_path):
    teacher = chat_teacher(demo_dir, tmp_path / "teacher")
    rows = chat_dataset(demo_dir, tmp_path / "chat.jsonl")
    template = tmp_path / "qa.jinja"
    template.write_text(QA)
    config = {
        "teacher": {"path": str(teacher), "dtype": "float32"},
        "dataset": {
            "path": str(tmp_path / "chat.jsonl"),
            "messages_field": "messages",
            "chat_template": str(template),
        },
        "tokenize": {"max_length": 200},
        "storage": {"value_dtype": "float32"},
        "num_shards": 2,
        "generation": {"top_k": 8, "batch_tokens": 1024},
    }
    workflow.run("--cores", "2", config=config)
    store = LogitStore(workflow.path("results/demo"))
    manifest = workflow.manifest()
    assert len(store) == len(rows) - 1 and store.has_loss_mask and not store.masked_only
    assert manifest["dropped"] == [{"sample_id": 5, "reason": "no messages"}]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    renderer = ChatRenderer(tokenizer, QA, ["assistant"], [tokenizer.eos_token_id])
    ones = 0
    for i in range(len(store)):
        rec = store[i]
        [(ids, mask, text, _)] = renderer.encode([0], [rows[rec["sample_id"]]["messages"]])
        np.testing.assert_array_equal(rec["input_ids"], ids[:200])
        np.testing.assert_array_equal(rec["loss_mask"], mask[:200])
        # The rendered template is the text (a truncated one: the start its tokens cover),
        # and the tokens' spans tile it: the template's special tokens hold their text.
        data = rec["text"].encode()
        assert text.startswith(rec["text"]) and (len(ids) > 200 or rec["text"] == text)
        assert b"".join(data[a:b] for a, b in rec["token_offsets"]) == data
        assert rec["loss_mask"].dtype == np.uint8
        ones += int(rec["loss_mask"].sum())
    assert 0 < ones < store.num_tokens
    assert manifest["loss_mask"] == {"ones": ones, "zeros": store.num_tokens - ones}
    assert manifest["stored_rows"] == store.num_tokens
    assert manifest["truncated_samples"] > 0  # 200 tokens cut the longest conversations
    for shard in workflow.path("results/demo/shards").glob("shard_*.h5"):
        with h5py.File(shard, "r", locking=False) as f:  # as the open store
            assert f["loss_mask"].dtype == np.uint8 and "row_offsets" not in f
    full = [store[i] for i in range(len(store))]
    full_bytes = sum(s["bytes"] for s in manifest["shards"])

    # The same data, storing only the rows a trainer uses.
    config["output_dir"] = "results/masked"
    config["generation"]["store_masked_only"] = True
    workflow.run("--cores", "2", config=config)
    masked = LogitStore(workflow.path("results/masked"))
    manifest = workflow.manifest("results/masked")
    assert masked.masked_only and len(masked) == len(full)
    stored = 0
    for i, reference in enumerate(full):
        rec = masked[i]
        keep = needed_rows(reference["loss_mask"], np.array([0, len(reference["loss_mask"])]))
        np.testing.assert_array_equal(rec["row_stored"], keep.astype(np.uint8))
        np.testing.assert_array_equal(rec["loss_mask"], reference["loss_mask"])
        np.testing.assert_array_equal(rec["input_ids"], reference["input_ids"])
        for name in ("topk_ids", "topk_logits", "logsumexp", "entropy"):
            assert rec[name].shape == reference[name].shape
            np.testing.assert_array_equal(rec[name][keep], reference[name][keep], err_msg=name)
            assert (rec[name][~keep] == 0).all()  # absent rows read as zeros
        # Every row a trainer weights (row t by loss_mask[t+1]) is there.
        assert keep.sum() == reference["loss_mask"][1:].sum()
        stored += int(keep.sum())
    assert manifest["stored_rows"] == stored < masked.num_tokens
    assert manifest["loss_mask"] == {"ones": ones, "zeros": masked.num_tokens - ones}
    assert sum(s["bytes"] for s in manifest["shards"]) < full_bytes
    # The training collate counts exactly the rows a trainer weights: all stored.
    from teacher_logits.training import collate

    batch = collate([masked[0], masked[1]])
    for row in range(2):
        n = len(masked[row]["input_ids"])
        stored = np.flatnonzero(masked[row]["row_stored"])
        np.testing.assert_array_equal(np.flatnonzero(batch["kd_mask"][row, :n].numpy()), stored)
    # A copied chat store passes the deep check, full and masked-only alike.
    from teacher_logits.verify import verify

    for output_dir in ("results/demo", "results/masked"):
        assert verify(workflow.path(output_dir), deep=True) == [], output_dir


@pytest.mark.slow
def test_chat_settings_are_checked_at_plan_time(workflow, tmp_path):
    cases = [
        (
            {"dataset": {"chat_template": str(tmp_path / "x.jinja")}},
            "dataset.chat_template is set but dataset.messages_field is null",
        ),
        (
            {"dataset": {"messages_field": "messages", "chat_template": str(tmp_path / "x.jinja")}},
            f"dataset.chat_template: file {tmp_path / 'x.jinja'} does not exist",
        ),
        (
            {"generation": {"store_masked_only": True}},
            "generation.store_masked_only needs a loss mask",
        ),
        (
            {"dataset": {"messages_field": "messages", "train_roles": ["robot"]}},
            "dataset.train_roles.0: 'robot' is not one of",
        ),
        ({"dataset": {"messages_field": "messages", "train_roles": []}}, "dataset.train_roles"),
    ]
    for config, message in cases:
        result = workflow.run("-n", config=config, check=False)
        assert result.returncode != 0 and message in result.stderr, (config, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_chat_and_overflow_settings_enter_the_fingerprint_only_when_used(tmp_path):
    from teacher_logits.config import meaning_settings

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    plain = meaning_settings(config)
    # Defaults reproduce the settings of stores made before these keys existed.
    assert plain["tokenize"] == {"max_length": 2048}
    assert "train_roles" not in plain["dataset"]
    assert "store_masked_only" not in plain["generation"]
    config["tokenize"]["stride"] = 17  # no effect with overflow: truncate
    config["dataset"]["train_roles"] = ["user"]  # no effect without messages_field
    assert meaning_settings(config) == plain

    config["tokenize"]["overflow"] = "split"
    assert meaning_settings(config)["tokenize"] == {
        "max_length": 2048,
        "overflow": "split",
        "stride": 17,
    }
    config["dataset"]["messages_field"] = "messages"
    template = tmp_path / "t.jinja"
    template.write_text(CHATML)
    config["dataset"]["chat_template"] = str(template)
    chat = meaning_settings(config)
    assert chat["dataset"]["train_roles"] == ["user"]
    template.write_text(QA)  # the template's text counts, not its path
    assert (
        meaning_settings(config)["dataset"]["chat_template_sha256"]
        != chat["dataset"]["chat_template_sha256"]
    )
