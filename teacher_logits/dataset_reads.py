"""Dataset files read consistently, and each segment's rows compared by content.

JSON Lines files grow while a run goes on, so what prepare records of a file (size,
SHA-256, row count) comes from one read of it: the bytes up to its last complete line
(``snapshot``). prepare keeps only those rows of what the datasets library loads and
then checks that those bytes did not change under it (``check_unchanged``); rows
appended meanwhile are simply planned by the next run.

Each segment records a digest of the rows it read (``rows_digests``: the rows' own
bytes, by row number over the files in list order), and every plan compares it: an
edit anywhere re-prepares exactly the segments whose rows it touched. The digests are
cached by every file's stat key, so a plan over unchanged files reads nothing, and a
changed file is read once for all segments. No torch.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from .errors import DataError
from .fingerprints import file_record, stat_key

LINES = ".jsonl"
BLOCK = 1 << 22


def _is_lines(path: Path) -> bool:
    return path.suffix == LINES and path.is_file()


def snapshot(path: Path, cache: dict) -> tuple[dict, str]:
    """(what prepare records of ``path``, the stat key it was read at). JSON Lines: the
    bytes up to its last complete line as they are now (a last line without a newline
    counts when it is whole JSON), their size, SHA-256 and non-blank lines (``rows``).
    Other formats: the whole content (rows are counted when loaded)."""
    key = stat_key(path)
    if not _is_lines(path):
        return file_record(path, cache), key
    name = f"snapshot:{path.resolve()}"
    entry = cache.get(name)
    if not isinstance(entry, dict) or entry.get("key") != key:
        limit = int(key.split(":")[0])  # the size when it was stat'ed: appends come later
        entry = cache[name] = {"key": key, **_complete_lines(path, limit)}
    record = {"path": str(path.resolve()), "size": entry["size"], "sha256": entry["sha256"]}
    return {**record, "rows": entry["rows"]}, key


def _complete_lines(path: Path, limit: int) -> dict:
    digest, size, rows, pending = hashlib.sha256(), 0, 0, b""
    with open(path, "rb") as handle:
        while size + len(pending) < limit:
            chunk = handle.read(min(BLOCK, limit - size - len(pending)))
            if not chunk:
                break
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            digest.update(data[:cut])
            size += cut
            rows += sum(1 for line in data[:cut].split(b"\n") if line.strip())
            pending = data[cut:]
    if pending.strip() and whole_json(pending):  # a file that ends without a newline
        digest.update(pending)
        size, rows = size + len(pending), rows + 1
    return {"size": size, "sha256": digest.hexdigest(), "rows": rows}


def whole_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # half a row still being written: the next run plans it
        return False
    return True


def load_as_read(path: Path, read: tuple[dict, str], load, scratch: Path):
    """The rows of ``path`` its snapshot ``read`` counted, from ``load(path)`` (a dataset);
    when ``path`` changes meanwhile (rows being appended, maybe half written), from
    ``load`` of a copy of exactly the bytes the snapshot hashed."""
    record = read[0]
    if record.get("rows") == 0:
        raise no_rows(path)
    loaded = _load_as_read(path, read, load, scratch)
    if record.get("rows") is None or len(loaded) == record["rows"]:
        return loaded
    if len(loaded) < record["rows"]:
        raise changed_while_read(path)
    return loaded.select(range(record["rows"]))


def _load_as_read(path: Path, read: tuple[dict, str], load, scratch: Path):
    record, key = read
    # A JSON Lines file whose last line was half written when it was read: the rows
    # before it, from the copy (``load`` of the file itself would fail on that line).
    whole = not _is_lines(path) or int(record["size"]) == int(key.split(":")[0])
    if whole and stat_key(path) == key:
        try:
            loaded = load(path)
        except DataError:
            if stat_key(path) == key:
                raise
        else:
            if stat_key(path) == key:
                return loaded
    if not _is_lines(path):
        raise changed_while_read(path)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        copy = Path(folder) / path.name
        with open(copy, "wb") as target:
            if _prefix_sha256(path, int(record["size"]), target) != record["sha256"]:
                raise changed_while_read(path)
        return load(copy)  # memory-mapped from the datasets cache: the copy may go


def _prefix_sha256(path: Path, size: int, copy=None) -> str | None:
    """SHA-256 of the first ``size`` bytes of ``path`` (None: it is shorter now), written to
    ``copy`` as they are read."""
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as handle:
        while left and (chunk := handle.read(min(left, BLOCK))):
            digest.update(chunk)
            if copy is not None:
                copy.write(chunk)
            left -= len(chunk)
    return None if left else digest.hexdigest()


def check_unchanged(path: Path, record: dict, key: str, cache: dict) -> None:
    """After prepare loaded ``path``: the bytes ``record`` describes are still its first
    (rows appended after them are fine), so what was tokenized is what was hashed."""
    if stat_key(path) == key:
        return
    if _is_lines(path):
        same = _prefix_sha256(path, int(record["size"])) == record["sha256"]
    else:
        same = file_record(path, cache)["sha256"] == record["sha256"]
    if not same:
        raise changed_while_read(path)


def changed_while_read(path: Path) -> DataError:
    return DataError(
        f"dataset.path: {path} changed while prepare read it (not only rows appended at "
        "its end); run the same command again once it is written"
    )


def no_rows(path: Path) -> DataError:
    return DataError(
        f"dataset.path: {path} has no rows (it is empty or holds only blank lines); "
        "remove it from dataset.path or give it rows"
    )


# --- rows by number over the files in list order -------------------------------------------


def _row_items(paths, split: str, cache: dict, records=None):
    """Each row of the files in list order, as bytes: a JSON Lines row is its line; a row
    of another format stands for itself by its file's content digest and its number.
    ``records``: prepare's snapshots, read up to their sizes (None: the files as they are)."""
    from .run_inputs import count_rows  # no cycle at import

    for position, path in enumerate(map(Path, paths)):
        record = records[position] if records else None
        if _is_lines(path):
            limit = int(record["size"]) if record else None
            with open(path, "rb") as handle:
                read = 0
                for line in handle:
                    read += len(line)
                    if limit is not None and read > limit:
                        break
                    if line.strip():
                        yield line.rstrip(b"\r\n")
            continue
        if record:
            rows, digest = int(record["rows"]), record["sha256"]
        else:
            rows, digest = count_rows(path, split, cache), file_record(path, cache)["sha256"]
        for row in range(rows):
            yield f"{digest}:{row}".encode()


def _stat_keys(paths) -> str:
    try:
        return "|".join(f"{Path(p).resolve()}={_deep_stat(Path(p))}" for p in paths)
    except OSError:
        return ""  # a file is gone: nothing cached matches


def _deep_stat(path: Path) -> str:
    if path.is_file():
        return stat_key(path)
    return ",".join(stat_key(p) for p in sorted(path.rglob("*")) if p.is_file())


def rows_digests(paths, spans, split: str, cache: dict, records=None) -> dict[tuple, str]:
    """A digest per span ``(first_row, end_row)`` of the rows it holds now (a span past
    the last row digests what there is, and so differs). Spans must not overlap.
    Cached in ``cache`` (the dataset's hash cache) by every file's stat key."""
    spans = sorted(set((int(a), int(b)) for a, b in spans))
    name = f"rows:{split}:" + "|".join(str(Path(p).resolve()) for p in paths)
    key = _stat_keys(paths)
    entry = cache.get(name) if records is None else None
    known = entry.get("spans", {}) if isinstance(entry, dict) and entry.get("key") == key else {}
    wanted = [span for span in spans if f"{span[0]}:{span[1]}" not in known]
    found = _digest_spans(_row_items(paths, split, cache, records), wanted) if wanted else {}
    known = {**known, **{f"{a}:{b}": digest for (a, b), digest in found.items()}}
    if records is None and key:
        cache[name] = {"key": key, "spans": known}
    return {span: known[f"{span[0]}:{span[1]}"] for span in spans}


def _digest_spans(items, spans: list[tuple]) -> dict[tuple, str]:
    digests = {span: hashlib.sha256() for span in spans}
    counts = dict.fromkeys(spans, 0)
    at = 0  # the first span that may still hold a row
    for row, item in enumerate(items):
        while at < len(spans) and row >= spans[at][1]:
            at += 1
        if at == len(spans):
            break
        first, end = spans[at]
        if row >= first:
            digests[spans[at]].update(len(item).to_bytes(8, "little") + item)
            counts[spans[at]] += 1
    return {span: f"{counts[span]}:{digests[span].hexdigest()[:32]}" for span in spans}


def blank_rows(paths, first: int, end: int, column: str, chat: bool, split: str, cache) -> int:
    """How many rows in ``first:end`` prepare will drop as blank (text null, empty or
    whitespace; chat: no messages). Read from JSON Lines rows; rows of other formats
    count as having text (prepare drops and lists them all the same)."""
    name = "blank:" + "|".join(str(Path(p).resolve()) for p in paths)
    key = f"{column}:{chat}:{first}:{end}:{_stat_keys(paths)}"
    entry = cache.get(name)
    if isinstance(entry, dict) and entry.get("key") == key:
        return int(entry["blank"])
    blank = 0
    for row, item in enumerate(_row_items(paths, split, cache)):
        if row >= end:
            break
        if row >= first and item.startswith(b"{") and _blank(item, column, chat):
            blank += 1
    cache[name] = {"key": key, "blank": blank}
    return blank


def _blank(line: bytes, column: str, chat: bool) -> bool:
    try:
        value = json.loads(line).get(column)
    except (ValueError, AttributeError):
        return False  # prepare names the broken line
    if value is None:
        return True
    if chat:
        return isinstance(value, list) and not value
    return isinstance(value, str) and not value.strip()
