"""Distillation into a student with another tokenizer, from the same store.

    from teacher_logits.training.cross_tokenizer import (
        build_vocab_map, collate_cross_tokenizer, cross_tokenizer_loss)
    vocab_map = build_vocab_map(store, student_tokenizer)        # once per pair
    collate_fn = functools.partial(collate_cross_tokenizer, student_tokenizer=student_tokenizer,
                                   vocab_map=vocab_map, max_length=2048)
    batch = collate_fn([store[i] for i in idx])
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = cross_tokenizer_loss(out.logits, batch, loss="both", ce_weight=0.5)

It reads the store's cross-tokenizer fields (``text``, ``token_offsets``,
``target_logprob``): the student tokenizes the stored text itself, and teacher and
student tokens are aligned by their byte spans (``alignment.py``, numpy only). Needs torch.
"""

from __future__ import annotations

from .alignment import Alignment, Tokenization, align
from .collation import collate_cross_tokenizer
from .losses import cross_tokenizer_loss
from .vocab import VocabMap, build_vocab_map, token_bytes

__all__ = [
    "Alignment",
    "Tokenization",
    "VocabMap",
    "align",
    "build_vocab_map",
    "collate_cross_tokenizer",
    "cross_tokenizer_loss",
    "token_bytes",
]
