"""Chat conversations -> rendered text, tokens and a loss mask (``dataset.messages_field``).

A conversation is rendered with a Jinja chat template (the teacher tokenizer's own or
``dataset.chat_template``), exactly as the student will see it, and tokenized with
``add_special_tokens=False`` (the rendering already holds its special tokens).

The loss mask comes from character offsets in the rendered text, which works with
any template (``{% generation %}`` blocks are rare in real templates). Each message's
content is wrapped in invisible private-use markers, the conversation is rendered
once with them, and the markers are stripped again, leaving the content's position in
the real rendering. A token is trained on (mask 1) when it overlaps the content of a
message whose role is in ``dataset.train_roles``, and so are the template's tokens
after that content up to and including the end-of-turn token (a token on which
generation stops), when one comes before the next message: the student must learn to
emit it, or it never ends its turn. The role header before the content stays 0: at
inference the prompt supplies it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .config import KNOWN_ROLES
from .errors import DataError

# Private-use code points: no tokenizer or dataset gives them meaning. Message i's
# content becomes OPEN i SEP content CLOSE i SEP.
_OPEN, _CLOSE, _SEP = "\ue000", "\ue001", "\ue002"
_MARK = re.compile(f"([{_OPEN}{_CLOSE}])(\\d+){_SEP}")


def check_messages(row: int, messages) -> list[dict]:
    """The messages of one row, validated; ``None`` values dropped (as transformers does)."""
    if not isinstance(messages, list):
        raise DataError(
            f"dataset row {row}: the messages field holds {type(messages).__name__}, not a list "
            "of {role, content} messages; point dataset.messages_field at the conversation column"
        )
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"dataset row {row}, message {i}: {type(message).__name__} instead of a "
                "{role, content} object; fix the dataset"
            )
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise DataError(
                f"dataset row {row}, message {i}: unknown role {role!r}; use one of "
                f"{', '.join(KNOWN_ROLES)} (fix the dataset or map its roles first)"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"dataset row {row}, message {i} ({role}): no content (got {content!r}); every "
                "message needs a string 'content' (use \"\" for an empty one)"
            )
        clean.append({k: v for k, v in message.items() if v is not None})
    return clean


def template_text(tokenizer, template_path: str | None) -> str:
    """The Jinja template to render with; a clear error when there is none."""
    if template_path:
        try:
            return Path(template_path).read_text()
        except OSError as exc:
            raise DataError(f"dataset.chat_template: cannot read {template_path} ({exc})") from None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise DataError(
            "dataset.messages_field is set but the teacher's tokenizer has no chat template; "
            "give a Jinja template file as dataset.chat_template"
        )
    return template


def stop_token_ids(tokenizer, teacher_path: str | Path) -> list[int]:
    """Tokens on which generation stops: the tokenizer's eos and generation_config's eos ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = Path(teacher_path) / "generation_config.json"
    if generation_config.is_file():
        try:
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int):
                ids.add(value)
    return sorted(ids)


class ChatRenderer:
    """Renders conversations and computes their token-level loss masks."""

    def __init__(self, tokenizer, template: str, train_roles, stop_ids):
        if not tokenizer.is_fast:
            raise DataError(
                "chat data needs a fast (Rust) tokenizer for character offsets, but the teacher's "
                "tokenizer is a slow one; save the teacher with a tokenizer.json"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.train_roles = set(train_roles)
        self.stop_ids = np.asarray(sorted(stop_ids), dtype=np.int64)

    def _render(self, row: int, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False
            )
        except Exception as exc:
            raise DataError(
                f"dataset row {row}: the chat template failed ({type(exc).__name__}: {exc}); fix "
                "the conversation or the template (dataset.chat_template)"
            ) from None

    def render(self, row: int, messages) -> tuple[str, list[tuple[int, int, bool]]]:
        """The rendered text and each rendered message's content span ``(start, end, trained)``."""
        messages = check_messages(row, messages)
        text = self._render(row, messages)
        marked = []
        for i, message in enumerate(messages):
            content = message["content"]
            core = content.strip()
            # Markers hug the stripped content, so templates that `trim` it still match.
            lead = content[: len(content) - len(content.lstrip())]
            trail = content[len(content.rstrip()) :]
            marked.append(
                {**message, "content": (f"{lead}{_OPEN}{i}{_SEP}{core}{_CLOSE}{i}{_SEP}{trail}")}
            )
        rendered, spans = _strip_markers(self._render(row, marked), messages, self.train_roles)
        if rendered is None or rendered != text:
            # The template rewrites content (cut a marker off, changed the text): find each
            # message's text in the real rendering instead.
            spans = _search_spans(row, text, messages, self.train_roles)
        return text, spans

    def loss_mask(
        self, offsets: np.ndarray, ids: np.ndarray, spans, text_length: int
    ) -> np.ndarray:
        """uint8 per token: 1 on trained content and its end of turn (see the module docstring)."""
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=np.uint8)
        for start, end, trained in spans:
            if not trained:
                continue
            mask[(starts < end) & (ends > start) & (ends > starts)] = 1
            # The turn ends before the next message's content starts (or the text ends).
            later = [s for s, e, _ in spans if s >= end and (s, e) != (start, end)]
            boundary = min(later, default=text_length)
            after = np.flatnonzero((starts >= end) & (starts < boundary))
            stops = after[np.isin(ids[after], self.stop_ids)]
            if len(stops):
                mask[after[0] : stops[0] + 1] = 1
        return mask

    def encode(self, rows: list[int], conversations: list) -> list[tuple]:
        """(input_ids int32, loss_mask uint8, rendered text, character offsets int64 [n, 2])
        per conversation, untruncated."""
        rendered = [self.render(row, messages) for row, messages in zip(rows, conversations)]
        encoded = self.tokenizer(
            [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
        )
        out = []
        for (text, spans), ids, offsets in zip(
            rendered, encoded["input_ids"], encoded["offset_mapping"]
        ):
            ids = np.asarray(ids, dtype=np.int64)
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            mask = self.loss_mask(offsets, ids, spans, len(text))
            out.append((ids.astype(np.int32), mask, text, offsets))
        return out


def _strip_markers(marked: str, messages: list[dict], train_roles) -> tuple[str | None, list]:
    """Remove the markers; return the plain text and the spans they enclosed.

    The text is ``None`` when a marker lost its partner: the template cut into content.
    """
    pieces, spans, opened = [], [], {}
    paired = True
    position = cursor = 0
    for match in _MARK.finditer(marked):
        pieces.append(marked[cursor : match.start()])
        position += match.start() - cursor
        cursor = match.end()
        index = int(match.group(2))
        if match.group(1) == _OPEN:
            opened[index] = position
        elif index in opened and index < len(messages):
            trained = messages[index]["role"] in train_roles
            spans.append((opened.pop(index), position, trained))
        else:
            paired = False
    pieces.append(marked[cursor:])
    if opened or not paired:
        return None, []
    return "".join(pieces), sorted(spans)


def _search_spans(row: int, text: str, messages: list[dict], train_roles) -> list:
    """Fallback for templates that change content: each message's text, in order."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        core = message["content"].strip()
        found = text.find(core, cursor)
        if found < 0:
            raise DataError(
                f"dataset row {row}: the chat template changes the text of message {i} "
                f"({message['role']}), so its tokens cannot be located for the loss mask; use a "
                "template that prints each message's content as it is (dataset.chat_template)"
            )
        spans.append((found, found + len(core), message["role"] in train_roles))
        cursor = found + len(core)
    return spans
