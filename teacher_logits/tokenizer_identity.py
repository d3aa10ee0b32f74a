"""What makes two tokenizers the same for distillation, and the teacher tokenizer's copy.

A store's ids index the teacher's vocabulary, so a student must map every token
string to the same id, agree on the special tokens, and add the same BOS/EOS. This
module summarises exactly that (``tokenizer_summary``), hashes it
(``tokenizer_content_fingerprint``: unlike a hash of the files, it survives a
re-save that rewrites them), and names the first difference between two summaries.
Gather copies the teacher's tokenizer files next to the store
(``copy_tokenizer_files``) so a trainer can check its student against them.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import TeacherError
from .layout import partial_path

# The files a Hugging Face tokenizer is loaded from; a model directory holds some of them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# The named special tokens a trainer relies on (padding, sequence ends, unknown text).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Encoded with and without special tokens to see what the tokenizer adds around a text.
PROBE_TEXT = "probe text"


def _around_text(with_special: list[int], without: list[int]) -> tuple[list[int], list[int]]:
    """The ids added in front of and after the text's own ids."""
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start], with_special[start + len(without) :]
    # The specials changed the text's own ids (rare): keep the whole encoding in front.
    return list(with_special), []


def tokenizer_summary(tokenizer) -> dict:
    """What distillation depends on, as plain JSON data: the vocabulary (token string ->
    id, added tokens included), the named special tokens and every special token with
    their ids, and the ids the tokenizer adds around every text by default."""
    vocab = {str(token): int(index) for token, index in tokenizer.get_vocab().items()}
    named = {}
    for name in NAMED_SPECIAL_TOKENS:
        token = getattr(tokenizer, name, None)
        named[name] = None if token is None else [str(token), vocab.get(str(token))]
    special = {str(t): vocab.get(str(t)) for t in tokenizer.all_special_tokens}
    with_special = list(tokenizer(PROBE_TEXT)["input_ids"])
    without = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    prepended, appended = _around_text(with_special, without)
    return {
        "vocab": vocab,
        "named_special_tokens": named,
        "special_tokens": special,
        "prepended_ids": [int(i) for i in prepended],
        "appended_ids": [int(i) for i in appended],
    }


def tokenizer_content_fingerprint(tokenizer) -> str:
    """sha256 of the summary in canonical JSON: the same for a tokenizer saved again
    (whatever bytes or key order its files get), another for any change the summary sees."""
    return summary_fingerprint(tokenizer_summary(tokenizer))


def summary_fingerprint(summary: dict) -> str:
    canonical = json.dumps(summary, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


# -- naming the first difference -------------------------------------------------------


def _named(token: str | None, index: int | None) -> str:
    return "not set" if token is None else f"{token!r} (id {index})"


def _vocab_difference(expected: dict, actual: dict) -> str | None:
    for token, index in sorted(expected.items(), key=lambda item: item[1]):
        if token not in actual:
            return f"token {token!r} (id {index} in the teacher's tokenizer) is missing from the student's"
        if actual[token] != index:
            return (
                f"token {token!r} has id {index} in the teacher's tokenizer "
                f"but {actual[token]} in the student's"
            )
    for token, index in sorted(actual.items(), key=lambda item: item[1]):
        if token not in expected:
            return f"the student's tokenizer has token {token!r} (id {index}), which the teacher's lacks"
    return None


def _vocab_sentence(expected: dict, actual: dict) -> str | None:
    first = _vocab_difference(expected, actual)
    if len(expected) != len(actual):
        size = f"the teacher's tokenizer has {len(expected)} tokens but the student's has {len(actual)}"
        return f"{size} (first difference: {first})" if first else size
    return first


def _special_sentence(expected: dict, actual: dict) -> str | None:
    for name in NAMED_SPECIAL_TOKENS:
        mine, theirs = expected["named_special_tokens"][name], actual["named_special_tokens"][name]
        if mine != theirs:
            word = name.removesuffix("_token")
            return (
                f"the {word} token is {_named(*(mine or [None, None]))} in the teacher's tokenizer "
                f"but {_named(*(theirs or [None, None]))} in the student's"
            )
    mine, theirs = expected["special_tokens"], actual["special_tokens"]
    only_teacher, only_student = (
        sorted(mine.keys() - theirs.keys()),
        sorted(theirs.keys() - mine.keys()),
    )
    if only_teacher:
        return f"{only_teacher[0]!r} is a special token of the teacher's tokenizer but not of the student's"
    if only_student:
        return f"{only_student[0]!r} is a special token of the student's tokenizer but not of the teacher's"
    # Same special tokens; their ids were compared with the vocabulary unless one is
    # outside it (None), which this still catches.
    for token in sorted(mine):
        if mine[token] != theirs[token]:
            return f"special token {token!r} has id {mine[token]} in the teacher's tokenizer but {theirs[token]} in the student's"
    return None


def _added_sentence(expected: dict, actual: dict) -> str | None:
    names = {index: token for token, index in expected["vocab"].items()}

    def spelled(ids: list[int]) -> str:
        return " ".join(_named(names.get(i, "?"), i) for i in ids) if ids else "nothing"

    for key, where in (
        ("prepended_ids", "in front of every text (BOS)"),
        ("appended_ids", "at the end of every text (EOS)"),
    ):
        if expected[key] != actual[key]:
            return (
                f"the teacher's tokenizer adds {spelled(expected[key])} {where} "
                f"but the student's adds {spelled(actual[key])}"
            )
    return None


def first_difference(expected_summary: dict, actual_summary: dict) -> str | None:
    """One sentence naming the first way ``actual`` (the student's) differs from
    ``expected`` (the teacher's): vocabulary size and the first token whose id differs
    or that is missing, then special tokens, then what is added around a text. None
    when they are the same."""
    return (
        _vocab_sentence(expected_summary["vocab"], actual_summary["vocab"])
        or _special_sentence(expected_summary, actual_summary)
        or _added_sentence(expected_summary, actual_summary)
    )


def first_meaning_difference(teacher_summary: dict, student_summary: dict) -> str | None:
    """Like ``first_difference``, but only where a store's ids would mean something
    else to the student: each id below the teacher's vocabulary size names the same
    token string, the teacher's special tokens (but its pad token) stay special, BOS and
    EOS are the same tokens and are added the same way. The student's pad token and the tokens
    it adds past the teacher's vocabulary are its own business. None when compatible."""
    teacher_names = {index: token for token, index in teacher_summary["vocab"].items()}
    student_names = {index: token for token, index in student_summary["vocab"].items()}
    for index in sorted(teacher_names):
        token, theirs = teacher_names[index], student_names.get(index)
        if theirs != token:
            where = f"{theirs!r}" if theirs is not None else "no token"
            moved = student_summary["vocab"].get(token)
            also = f" (which gives {token!r} id {moved})" if moved is not None else ""
            return (
                f"id {index} is {token!r} in the teacher's tokenizer but {where} in the "
                f"student's{also}"
            )
    for name in ("bos_token", "eos_token"):
        mine = teacher_summary["named_special_tokens"][name]
        theirs = student_summary["named_special_tokens"][name]
        if mine != theirs:
            word = name.removesuffix("_token")
            return (
                f"the {word} token is {_named(*(mine or [None, None]))} in the teacher's "
                f"tokenizer but {_named(*(theirs or [None, None]))} in the student's"
            )
    theirs = student_summary["special_tokens"]
    # The teacher's pad token may lose its role: a student padding with EOS drops it.
    pad = (teacher_summary["named_special_tokens"]["pad_token"] or [None])[0]
    for token, index in sorted(teacher_summary["special_tokens"].items()):
        if token not in theirs and token != pad:
            return (
                f"{token!r} (id {index}) is a special token of the teacher's tokenizer but "
                "not of the student's"
            )
    return _added_sentence(teacher_summary, student_summary)


# -- the teacher tokenizer's copy ------------------------------------------------------


def _tokenizer_like(name: str) -> bool:
    """Files other tokenizers load from: SentencePiece and tiktoken models, and the code
    of a ``trust_remote_code`` tokenizer."""
    return name.startswith(("tokenizer", "tokenization")) or name.endswith((".model", ".tiktoken"))


def copy_tokenizer_files(source_dir: str | os.PathLike, dest_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of a model directory to ``dest_dir``, replacing an
    existing one. The files are written into a sibling folder that is then renamed into
    place, so a reader sees the old copy, the new one, or (for the instant between two
    renames) none, never half of one. Returns the names copied."""
    source, dest = Path(source_dir), Path(dest_dir)
    names = sorted(
        path.name
        for path in source.iterdir()
        if path.is_file() and (path.name in TOKENIZER_FILES or _tokenizer_like(path.name))
    )
    if not names:
        raise TeacherError(
            f"{source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "point teacher.path at a model directory saved with its tokenizer"
        )
    staging = partial_path(dest)
    replaced = partial_path(dest.with_name(dest.name + ".old"))
    # Left by a copy that was interrupted.
    for leftover in (staging, replaced):
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir(parents=True)
    for name in names:
        shutil.copyfile(source / name, staging / name)
    # A directory cannot be renamed over a non-empty one: move the old copy aside first.
    if dest.exists():
        os.rename(dest, replaced)
    os.rename(staging, dest)
    if replaced.exists():
        shutil.rmtree(replaced)
    return names
