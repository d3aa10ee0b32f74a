"""``check_tokenizer``: refuse a student whose tokenizer is not the teacher's.

The store's ``input_ids`` and ``topk_ids`` index the teacher's vocabulary; a student
whose tokenizer maps a token string to another id, has other special tokens or adds
BOS/EOS differently learns from the wrong targets without any error. Gather copies
the teacher's tokenizer into the store (``tokenizer/``); this compares the student's
with it (``teacher_logits.tokenizer_identity``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TokenizerMismatch, TrainingInputError
from ..layout import INDEX_NAME, RunLayout
from ..tokenizer_identity import first_difference, summary_fingerprint, tokenizer_summary

WHY = (
    "the student must use the teacher's tokenizer (the store's ids index the teacher's vocabulary)"
)


def _store_root(store) -> Path:
    if not isinstance(store, (str, os.PathLike)):
        return Path(store.root)  # a LogitStore
    path = Path(store)
    # The store directory, or its index.h5 (which LogitStore also accepts).
    return path.parent if path.name == INDEX_NAME or path.is_file() else path


def _load(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _stored_fingerprint(store, root: Path) -> str | None:
    if isinstance(store, (str, os.PathLike)):
        from ..store.reader import LogitStore

        try:
            with LogitStore(root) as opened:
                return opened.tokenizer_content_fingerprint
        except (OSError, ValueError):  # no readable index: compare with the copy alone
            return None
    return getattr(store, "tokenizer_content_fingerprint", None)


def check_tokenizer(store, tokenizer) -> None:
    """Raise ``TokenizerMismatch`` naming the first difference between the teacher's
    tokenizer (kept in the store) and ``tokenizer`` (an object, or a directory to load
    it from); return None when they are the same for distillation: same token strings
    and ids, special tokens and ids, and BOS/EOS added around a text.

    ``store``: a ``LogitStore``, or the store directory (or its ``index.h5``)."""
    root = _store_root(store)
    student = tokenizer_summary(_load(tokenizer))
    # The store records what the teacher's tokenizer does: an equal student needs no
    # loading of the copy (which, for trust_remote_code tokenizers, may need their code).
    if _stored_fingerprint(store, root) == summary_fingerprint(student):
        return
    teacher_dir = RunLayout(root).tokenizer_dir
    if not teacher_dir.is_dir():
        raise TrainingInputError(
            f"{root} has no {teacher_dir.name}/ folder with the teacher's tokenizer: it was "
            "gathered by an older version of the workflow; gather it again with this one "
            "(snakemake --cores 4 --forcerun gather, with the run's config) to add it"
        )
    from transformers import AutoTokenizer

    teacher = tokenizer_summary(AutoTokenizer.from_pretrained(str(teacher_dir)))
    difference = first_difference(teacher, student)
    if difference:
        raise TokenizerMismatch(f"{difference}; {WHY}")
