"""Fingerprints of what gives the stored numbers their meaning.

They let gather refuse a shard from another teacher or config, and let a rerun
know which finished work still holds. Cheap by design: weights are fingerprinted
by name, size and their first and last MiB, not by hashing hundreds of GB.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def teacher_fingerprint(path: str | Path) -> str:
    path = Path(path)
    parts = [(path / "config.json").read_bytes()]
    for weight in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = weight.stat().st_size
        with open(weight, "rb") as handle:
            head = handle.read(EDGE_BYTES)
            handle.seek(max(0, size - EDGE_BYTES))
            tail = handle.read(EDGE_BYTES)
        parts += [weight.name, size, hashlib.sha256(head + tail).hexdigest()]
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


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            h.update(chunk)
    return h.hexdigest()
