"""``check_tokenizer``: refuse a student to whom the store's ids would mean other tokens.

The store's ``input_ids`` and ``topk_ids`` index the teacher's vocabulary; a student
whose tokenizer gives one of those ids to another token string, drops a special role
or adds BOS/EOS differently learns from the wrong targets without any error. Only
those ids matter: a student with another pad token or with tokens added past the
teacher's vocabulary reads the store the same (``kd_loss`` takes its larger
vocabulary). Gather copies the teacher's tokenizer into the store (``tokenizer/``);
this compares the student's with it (``teacher_logits.tokenizer_identity``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TokenizerMismatch, TrainingInputError
from ..layout import INDEX_NAME, RunLayout
from ..tokenizer_identity import first_meaning_difference, summary_fingerprint, tokenizer_summary

WHY = (
    "every id the store holds must mean the same token to the student; a student with "
    "another tokenizer distils through teacher_logits.training.cross_tokenizer"
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
    """Raise ``TokenizerMismatch`` naming the first id that would mean something else to
    ``tokenizer`` (an object, or a directory to load it from) than to the teacher's
    tokenizer (kept in the store); return None when every id below the teacher's
    vocabulary size names the same token string, the teacher's special tokens are
    special to the student too, and BOS/EOS are the same and added the same way.
    Whatever the student's pad token or the tokens it added after the teacher's
    vocabulary, it passes.

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
    difference = first_meaning_difference(teacher, student)
    if difference:
        raise TokenizerMismatch(f"{difference}; {WHY}")
