"""The embedded demo: a corpus, a tokenizer and a small trained teacher, built offline.

The corpus is the docstrings of the Python standard library installed on this
machine (nothing is copied into the repository or downloaded). A byte-level BPE
tokenizer is trained on it, and a small Llama is trained for a fixed number of
steps with a fixed seed, so its next-token distributions are peaked like a real
model's. Both are saved with ``save_pretrained`` and loaded back through the
normal ``from_pretrained`` path.
"""

from __future__ import annotations

import ast
import json
import logging
import sysconfig
import time
from pathlib import Path

log = logging.getLogger("demo")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def stdlib_docstrings(limit: int, min_chars: int = 40) -> list[str]:
    """Docstrings of stdlib modules, functions and classes, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idlelib") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
                    if len(texts) >= limit:
                        return texts
    return texts


def build_corpus(out_path: str, num_documents: int) -> None:
    texts = stdlib_docstrings(num_documents)
    if not texts:
        raise RuntimeError("found no docstrings in the standard library of this Python")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    log.info("wrote %d documents to %s", len(texts), out)


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    # Like most LM tokenizers: a BOS token in front of every text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_teacher(
    corpus_path: str,
    out_dir: str,
    vocab_size: int = 2048,
    train_steps: int = 300,
    seed: int = 0,
    threads: int = 2,
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    texts = [json.loads(line)["text"] for line in open(corpus_path)]
    tokenizer = build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)

    # One long token stream cut into fixed blocks: simple, dense, deterministic.
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in ids]
    block, batch = 128, 16
    data = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=train_steps)
    model.train()
    start = time.time()
    for step in range(train_steps):
        rows = torch.randint(0, data.shape[0], (batch,), generator=generator)
        inputs = data[rows]
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == train_steps - 1:
            log.info(
                "step %d/%d loss %.3f (%.0f s)", step, train_steps, loss.item(), time.time() - start
            )
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("saved the demo teacher (%d parameters) to %s", model.num_parameters(), out)
