"""What a gathered store holds: ``teacher-logits info STORE`` (``--json`` for tools).

Teacher and tokenizer (fingerprints; the tokenizer copy gather made), vocabulary,
samples, tokens, top-k, modes, temperatures, bytes per token and format versions,
from ``manifest.json``, ``index.h5`` and each shard's attributes. Reads attributes
only, never the rows; needs h5py, never torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .errors import StoreError
from .layout import RunLayout
from .store.format import read_attrs
from .store.partial import open_read_only
from .verify import load_manifest, store_dir


def describe(path) -> dict:
    root = store_dir(path)
    layout = RunLayout(root)
    manifest = load_manifest(root)
    if not layout.index.is_file():
        raise StoreError(f"{layout.index}: missing; run the workflow's gather step first")
    with open_read_only(layout.index) as index:
        index_attrs = read_attrs(index)
    shard_versions, library_versions = Counter(), None
    for entry in manifest["shards"]:
        with open_read_only(root / entry["path"]) as shard:
            attrs = read_attrs(shard)
        shard_versions[int(attrs["format_version"])] += 1
        library_versions = library_versions or attrs.get("versions")
    settings = manifest.get("settings", {})
    generation = settings.get("generation", {})
    mode = generation.get("mode", "topk")
    stats = manifest.get("stats", {})
    tokenizer = _tokenizer(layout.tokenizer_dir)
    return {
        "store": str(root),
        "teacher": {
            "fingerprint": manifest.get("teacher_fingerprint"),
            "content_digest": manifest.get("teacher_content_digest"),
            "dtype": settings.get("teacher", {}).get("dtype"),
        },
        "tokenizer": {
            "fingerprint": manifest.get("tokenizer_fingerprint"),
            "content_fingerprint": manifest.get("tokenizer_content_fingerprint"),
            **tokenizer,
        },
        "vocab_size": manifest.get("vocab_size"),
        "samples": manifest.get("num_samples"),
        "dropped": len(manifest.get("dropped", [])),
        "tokens": manifest.get("num_tokens"),
        "shards": len(manifest["shards"]),
        "top_k": manifest.get("top_k"),
        "modes": {
            "generation": mode,
            **({"samples": generation.get("samples", 16)} if mode != "topk" else {}),
            **(
                {"sample_temperature": generation.get("sample_temperature", 1.0)}
                if mode != "topk"
                else {}
            ),
            "chat": bool(index_attrs.get("has_loss_mask", False)),
            "masked_only": bool(index_attrs.get("masked_only", False)),
            "value_dtype": settings.get("storage", {}).get("value_dtype", "float16"),
        },
        "temperatures": manifest.get("temperatures", [1.0]),
        "bytes_per_token": stats.get("bytes_per_token"),
        "uncompressed_bytes_per_token": stats.get("uncompressed_bytes_per_token"),
        "format_versions": {
            "manifest": manifest.get("format_version"),
            "index": index_attrs.get("format_version"),
            "shards": {str(v): n for v, n in sorted(shard_versions.items())},
        },
        "config_fingerprint": manifest.get("config_fingerprint"),
        "library_versions": library_versions,
    }


def _tokenizer(folder: Path) -> dict:
    """The copy gather made: where, and its class (from tokenizer_config.json)."""
    if not folder.is_dir():
        return {"copy": None}
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return {"copy": str(folder), "class": config.get("tokenizer_class")}


def render(info: dict) -> str:
    modes = info["modes"]
    mode = modes["generation"]
    if mode != "topk":
        mode += f" ({modes['samples']} draws at T={modes['sample_temperature']})"
    mode += ", chat (loss_mask)" if modes["chat"] else ", plain text"
    mode += ", masked rows only" if modes["masked_only"] else ""
    tokenizer = info["tokenizer"]
    copy = tokenizer["copy"] or "no copy (gathered before tokenizer copies)"
    versions = info["format_versions"]
    shard_versions = ", ".join(f"v{v} x{n}" for v, n in versions["shards"].items())
    per_token = info["bytes_per_token"]
    rows = [
        ("store", info["store"]),
        ("teacher", f"{info['teacher']['fingerprint']} ({info['teacher']['dtype']})"),
        ("tokenizer", f"{tokenizer['fingerprint']}; {copy}"),
        ("vocabulary", info["vocab_size"]),
        ("samples", f"{info['samples']} in {info['shards']} shards ({info['dropped']} dropped)"),
        ("tokens", info["tokens"]),
        ("top-k", info["top_k"]),
        ("modes", f"{mode}; values {modes['value_dtype']}"),
        ("temperatures", ", ".join(str(t) for t in info["temperatures"])),
        ("bytes/token", _per_token(per_token, info["uncompressed_bytes_per_token"])),
        (
            "format",
            f"manifest v{versions['manifest']}, index v{versions['index']}, shards {shard_versions}",
        ),
        ("config", info["config_fingerprint"]),
    ]
    return "\n".join(f"{name:<13}{value}" for name, value in rows)


def _per_token(on_disk, raw) -> str:
    if on_disk is None:
        return "unknown (gathered before it was measured)"
    return f"{on_disk:.1f} on disk" + ("" if raw is None else f", {raw:.1f} uncompressed")


def main(argv: list[str] | None = None, prog: str = "python -m teacher_logits.info") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="What a gathered store holds (reads attributes only)."
    )
    parser.add_argument("store", help="the store: the folder with index.h5 and manifest.json")
    parser.add_argument("--json", action="store_true", help="print it as JSON for other tools")
    args = parser.parse_args(argv)
    try:
        info = describe(args.store)
    except StoreError as exc:
        print(f"info: {exc}")
        return 1
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
