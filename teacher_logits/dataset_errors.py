"""Where a dataset file is broken: the file, the 1-based line, the column or byte, and the fix.

Called only after ``datasets`` failed to read a file (or a row of it), so reading the
file once more, line by line, costs nothing on the normal path.
"""

from __future__ import annotations

import json
from pathlib import Path

# Files that hold one JSON object per line (.json may instead hold one JSON document).
LINE_SUFFIXES = (".jsonl", ".json")
TYPE_NAMES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def _encoding_fix(path: Path) -> str:
    return (
        f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > "
        f"{path.with_suffix('.utf8' + path.suffix)}` (use the file's real encoding for -f)"
    )


def _not_utf8(path: Path, where: str, raw: bytes, start: int, reason: str) -> str:
    """``raw[start]`` (0-based within its line) is the first byte that is not UTF-8."""
    bad = raw[start : start + 1]
    return (
        f"dataset.path: could not read {path}: {where}, byte {start + 1} is not valid "
        f"UTF-8 ({reason}: 0x{bad.hex()}); {_encoding_fix(path)}"
    )


def _not_json(path: Path, line: int, exc: json.JSONDecodeError, last: bool) -> str:
    where = f"dataset.path: could not read {path}"
    if last and (exc.msg.startswith("Unterminated") or exc.pos >= len(exc.doc.rstrip())):
        return (
            f"{where}: its last line ({line}) stops in the middle of a JSON object, so the "
            "file is cut off; copy it again, or remove the last line"
        )
    return (
        f"{where}: line {line}, column {exc.colno} is not valid JSON ({exc.msg}); check that it "
        "is valid JSON Lines (one JSON object per line) and fix or remove that line"
    )


def _decode_line(raw: bytes, number: int) -> str:
    # Decoded as plain UTF-8 (so error positions count the raw bytes), then the BOM dropped.
    text = raw.decode("utf-8")
    return text.lstrip("\ufeff") if number == 1 else text


def _line_problem(path: Path) -> tuple[str, bool] | None:
    """The first line that is not UTF-8, not JSON or not an object: (message, whether it is
    the first line with content)."""
    with open(path, "rb") as handle:
        seen = 0
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue  # blank lines are skipped by the reader too
            seen += 1
            first = seen == 1
            try:
                value = json.loads(_decode_line(raw, number))
            except UnicodeDecodeError as exc:
                return _not_utf8(path, f"line {number}", raw, exc.start, exc.reason), first
            except json.JSONDecodeError as exc:
                last = not any(rest.strip() for rest in handle)
                return _not_json(path, number, exc, last), first
            if not isinstance(value, dict):
                kind = TYPE_NAMES.get(type(value), "null")
                return (
                    f"dataset.path: could not read {path}: line {number} holds a JSON {kind}, "
                    'not an object; give every line as one {"field": value, ...} object',
                    first,
                )
    return None


def _document_problem(path: Path) -> str | None:
    """The same for a file that holds one JSON document (a list of rows, or an object)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        where = f"line {line}"
        return _not_utf8(path, where, raw[line_start:], exc.start - line_start, exc.reason)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.msg.startswith("Unterminated") or exc.pos >= len(text.rstrip())
        if cut:
            return (
                f"dataset.path: could not read {path}: it stops in the middle of its JSON "
                f"document (at line {exc.lineno}), so the file is cut off; copy it again"
            )
        return (
            f"dataset.path: could not read {path}: line {exc.lineno}, column {exc.colno} is not "
            f"valid JSON ({exc.msg}); fix the file there"
        )
    return None


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        for raw in handle:
            stripped = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
            if stripped:
                return stripped[:1]
    return b""


def describe_unreadable(path: Path) -> str | None:
    """One line naming the first broken line of a JSON Lines / JSON file and the fix;
    ``None`` when every line reads (the failure lies elsewhere)."""
    if not path.is_file() or path.suffix not in LINE_SUFFIXES:
        return None
    if _first_byte(path) == b"[":
        return _document_problem(path)
    found = _line_problem(path)
    if found and found[1] and _first_byte(path) == b"{":
        # Maybe one pretty-printed JSON object ({"data": [...]}) rather than JSON Lines.
        document = _document_problem(path)
        if document is None or path.suffix == ".json":
            return document
    return found[0] if found else None


def _nth_row_line(path: Path, row: int) -> tuple[int, bytes] | None:
    """The line (number, bytes) that holds row ``row``: the ``row``-th non-blank line."""
    with open(path, "rb") as handle:
        seen = -1
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return number, raw
    return None


def describe_undecodable_row(path: Path, row: int, exc: UnicodeDecodeError) -> str:
    """One line for a row whose text is not UTF-8 (found when the row is read)."""
    if path.is_file() and path.suffix in LINE_SUFFIXES:
        found = _nth_row_line(path, row)
        if found is not None:
            number, raw = found
            try:
                _decode_line(raw, number)
            except UnicodeDecodeError as line_exc:
                where = f"line {number} (dataset row {row})"
                return _not_utf8(path, where, raw, line_exc.start, line_exc.reason)
    return (
        f"dataset.path: could not read {path}: dataset row {row} holds text that is not valid "
        f"UTF-8 ({exc.reason}); re-encode the dataset as UTF-8"
    )
