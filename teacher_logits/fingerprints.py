"""Fingerprints of what gives the stored numbers their meaning.

They let gather refuse a shard from another teacher or config, and let a rerun
know which finished work still holds. Cheap by design: weights are fingerprinted
by name, size and their first and last MiB (``teacher_fingerprint``, recorded in
every shard since format version 1) plus a sample of every tensor's bytes and the
teacher's other files whole (``teacher_content_digest``), not by hashing hundreds of GB. Datasets are hashed whole,
once per change of the file's size, mtime, ctime or inode (``content_digest``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .json_cache import has_fields

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)
EDGE_BYTES = 1 << 20
# teacher_content_digest reads this much at the start, middle and end of every tensor
# (safetensors), or one block per SAMPLE_STRIDE of other weight files.
SAMPLE_BYTES = 4096
SAMPLE_STRIDE = 64 << 20


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def teacher_fingerprint(path: str | Path) -> str:
    path = Path(path)
    parts = [(path / "config.json").read_bytes()]
    for weight in weight_files(path):
        size = weight.stat().st_size
        with open(weight, "rb") as handle:
            head = handle.read(EDGE_BYTES)
            handle.seek(max(0, size - EDGE_BYTES))
            tail = handle.read(EDGE_BYTES)
        parts += [weight.name, size, hashlib.sha256(head + tail).hexdigest()]
    return _digest(parts)


def weight_files(path: str | Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def teacher_files(path: str | Path) -> list[Path]:
    """Every file of a teacher folder that changes its logits: config, weights and their
    index, tokenizer, and code for ``trust_remote_code``."""
    path = Path(path)
    names = {"config.json", "added_tokens.json", *TOKENIZER_FILES}
    found = [
        p
        for p in path.iterdir()
        if p.is_file()
        and (
            p.name in names
            or p.suffix in (*WEIGHT_SUFFIXES, ".py")
            or p.name.endswith(".index.json")
        )
    ]
    return sorted(found)


def _safetensors_spans(handle, size: int) -> list[tuple[int, int]] | None:
    """(start, end) byte spans of the header and every tensor; None if not safetensors."""
    head = handle.read(8)
    if len(head) < 8:
        return None
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        return None
    try:
        header = json.loads(handle.read(header_len))
    except ValueError:
        return None
    base = 8 + header_len
    spans = [(0, base)]
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry:
            begin, end = entry["data_offsets"]
            spans.append((base + int(begin), base + int(end)))
    return sorted(spans)


def _sample_offsets(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) reads: a header whole, then the start, middle and end of each span."""
    reads = [(spans[0][0], spans[0][1] - spans[0][0])]
    for begin, end in spans[1:]:
        length = min(SAMPLE_BYTES, end - begin)
        for offset in {begin, begin + (end - begin - length) // 2, end - length}:
            reads.append((offset, length))
    return sorted(reads)


def teacher_content_digest(path: str | Path) -> str:
    """What the teacher's logits depend on, by content: every file of ``teacher_files``
    that is no weight file (config, tokenizer, remote code, weight index) whole, and of
    each weight file a sample: each tensor's first, middle and last 4 KiB (safetensors),
    or 4 KiB every 64 MiB (other formats). A fine-tune, merge or another checkpoint of the
    same shape changes it; its cost is a few thousand small reads."""
    parts = []
    for file in teacher_files(path):
        size = file.stat().st_size
        if file.suffix not in WEIGHT_SUFFIXES:
            parts += [file.name, file_sha256(file)]
            continue
        with open(file, "rb") as handle:
            spans = _safetensors_spans(handle, size) if file.suffix == ".safetensors" else None
            if spans is None:
                spans = [(0, min(size, EDGE_BYTES))]
                spans += [(o, min(size, o + SAMPLE_BYTES)) for o in range(0, size, SAMPLE_STRIDE)]
                spans.append((max(0, size - EDGE_BYTES), size))
            digest = hashlib.sha256()
            for offset, length in _sample_offsets(spans):
                handle.seek(offset)
                digest.update(handle.read(length))
        parts += [file.name, size, digest.hexdigest()]
    return _digest(parts)


def tokenizer_fingerprint(path: str | Path) -> str:
    path = Path(path)
    parts = []
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            parts += [name, (path / name).read_bytes()]
    return _digest(parts)


# The fingerprint once hashed the shard format version; it is pinned at 2, the first
# version readers still accept, so a later format bump (which readers and gather accept
# beside older shards) does not make every finished shard look like another run's.
FINGERPRINT_FORMAT_VERSION = 2


def config_fingerprint(settings: dict, teacher_fp: str, tokenizer_fp: str) -> str:
    """What gives the stored numbers their meaning: settings, teacher, tokenizer."""
    blob = json.dumps(
        {
            "settings": settings,
            "teacher": teacher_fp,
            "tokenizer": tokenizer_fp,
            "format_version": FINGERPRINT_FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return _digest([blob])


def run_config_fingerprint(
    settings: dict, teacher_fp: str, tokenizer_fp: str, earlier: dict | None = None
) -> str:
    """The fingerprint a run's shards carry. Until shards could be appended it also hashed
    ``dataset.max_samples``; a run planned then keeps its fingerprint while its settings
    mean the same (``earlier``: the recorded plan's ``config_fingerprint`` and settings), so
    the upgrade regenerates none of its shards and appended shards match them."""
    if earlier:
        legacy = _as_recorded(settings, earlier.get("settings") or {})
        if legacy != settings and (
            config_fingerprint(legacy, teacher_fp, tokenizer_fp) == earlier["config_fingerprint"]
        ):
            return earlier["config_fingerprint"]
    return config_fingerprint(settings, teacher_fp, tokenizer_fp)


def _as_recorded(settings: dict, recorded: dict) -> dict:
    """``settings`` as an earlier version recorded the same meaning: with
    ``dataset.max_samples`` (before appends), and a sampled run with the top-k size and
    value dtype it was given (before they stopped counting for a store without a top-k)."""
    if "max_samples" in recorded.get("dataset", {}):
        max_samples = recorded["dataset"]["max_samples"]
        settings = {**settings, "dataset": {**settings["dataset"], "max_samples": max_samples}}
    if (settings.get("generation") or {}).get("mode") == "sampled":
        for section, key in (("generation", "top_k"), ("storage", "value_dtype")):
            if key in recorded.get(section, {}):
                settings = {**settings, section: {**settings[section], key: recorded[section][key]}}
    return settings


def stat_key(path: Path) -> str:
    # ctime moves on every write and cannot be set back by cp -p or rsync -a.
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


# The dataset's hash cache (``RunLayout.digest_cache``), entry by entry: what each kind
# of entry must hold for the code that reads it. Each is keyed by the stat key it was
# made at, except the row counts (``rows:<content digest>:<split>``, an int), which are
# keyed by content. A new kind of entry adds its prefix here.
DIGEST_ENTRY_FIELDS = {
    "grown:": {"grown": bool},  # grown_from
    "snapshot:": {"size": int, "sha256": str, "rows": int},  # dataset_reads.snapshot
    "rows:": {"spans": dict},  # dataset_reads.rows_digests
    "blank:": {"blank": int},  # dataset_reads.blank_rows
    "": {"sha256": str},  # a file's resolved path: content_digest
}


def digest_entry_ok(name: str, entry) -> bool:
    """Whether ``entry`` has the shape the code reading cache entry ``name`` relies on."""
    prefix = next(p for p in DIGEST_ENTRY_FIELDS if name.startswith(p))
    if prefix == "rows:" and isinstance(entry, int) and not isinstance(entry, bool):
        return entry >= 0
    return has_fields(entry, key=str, **DIGEST_ENTRY_FIELDS[prefix])


def content_digest(path: str | Path, cache: dict) -> str:
    """SHA-256 over a file's (or a folder's files') content. ``cache`` maps a file's
    resolved path to its stat key and hash, so an unchanged file is not read again."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:  # a save_to_disk folder; datasets' own cache files are no content
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not p.name.startswith("cache-")
        )
    parts = []
    for file in files:
        key, name = stat_key(file), str(file.resolve())
        entry = cache.get(name)
        if not entry or entry.get("key") != key:
            entry = cache[name] = {"key": key, "sha256": file_sha256(file)}
        parts += [file.relative_to(path).as_posix() if file != path else "", entry["sha256"]]
    return _digest(parts)


def dataset_digest(paths: list[Path], cache: dict) -> str:
    """``content_digest`` of one path (as runs recorded it before lists), or of a list."""
    if len(paths) == 1:
        return content_digest(paths[0], cache)
    return _digest([content_digest(path, cache) for path in paths])


def recorded_dataset_digest(records: list[dict]) -> str:
    """``dataset_digest`` of what prepare read, from its records (``file_record``'s shape)."""
    parts = [
        r["sha256"] if Path(r["path"]).is_dir() else _digest(["", r["sha256"]]) for r in records
    ]
    return parts[0] if len(parts) == 1 else _digest(parts)


def file_record(path: Path, cache: dict) -> dict:
    """What a plan records of one dataset path, to tell later whether rows were appended:
    its size and SHA-256 (a folder: its ``content_digest``)."""
    digest = content_digest(path, cache)
    if path.is_file():
        digest = cache[str(path.resolve())]["sha256"]
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": digest}


def grown_from(path: Path, record: dict, cache: dict) -> bool:
    """True when ``path`` still starts with exactly the bytes ``record`` describes (the
    file grew at its end, after a full last line). Cached by the file's stat key."""
    if path.suffix != ".jsonl" or path.stat().st_size <= record["size"]:
        return False
    entry = cache.get(f"grown:{path.resolve()}") or {}
    wanted = f"{stat_key(path)}:{record['size']}:{record['sha256']}"
    if entry.get("key") != wanted:
        h, left = hashlib.sha256(), record["size"]
        with open(path, "rb") as handle:
            while left and (chunk := handle.read(min(left, 1 << 22))):
                h.update(chunk)
                left -= len(chunk)
            handle.seek(record["size"] - 1)
            full_line = handle.read(1) == b"\n"
        cache[f"grown:{path.resolve()}"] = entry = {
            "key": wanted,
            "grown": full_line and h.hexdigest() == record["sha256"],
        }
    return entry["grown"]


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            h.update(chunk)
    return h.hexdigest()
