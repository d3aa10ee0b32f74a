"""Training-side helpers: read a store into a student's training loop.

    from teacher_logits.training import (collate, kd_loss, check_tokenizer,
                                         TokenizerMismatch, ShardLocalBatchSampler,
                                         KDTrainer, KDConfig)

``collate`` and ``kd_loss`` need torch, ``KDTrainer`` and ``KDConfig`` transformers;
``ShardLocalBatchSampler`` needs neither, and importing this package imports torch
or transformers only when a helper that needs it is first used.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import TokenizerMismatch, TrainingInputError

__all__ = [
    "collate",
    "kd_loss",
    "check_tokenizer",
    "TokenizerMismatch",
    "TrainingInputError",
    "ShardLocalBatchSampler",
    "KDTrainer",
    "KDConfig",
]

# name -> the module that defines it; loaded on first use so the sampler stays torch-free.
_LAZY = {
    "collate": ".collation",
    "kd_loss": ".losses",
    "check_tokenizer": ".tokenizer_check",
    "ShardLocalBatchSampler": ".sampler",
    "KDTrainer": ".trainer",
    "KDConfig": ".trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
