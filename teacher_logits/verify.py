"""Check a gathered store (possibly copied or moved) against its ``manifest.json``.

    python -m teacher_logits.verify OUTPUT_DIR [--deep] [--workers N]

Compares the sha256 of every shard and of ``index.h5`` with the checksums gather
wrote into ``manifest.json``, so any changed byte is found, even in unused space
or an attribute. ``--deep`` also re-validates every shard's contents (schema,
shapes, values, fingerprints, samples against ``index.h5``) in worker processes, and
refuses a store whose shards (or ``index.h5``) disagree with ``manifest.json`` on the
teacher, tokenizer or config fingerprint, naming the shards on each side.
Prints one line per problem and exits 1, or prints one summary line and exits 0 (and
notes shard files the manifest does not list: ``prune`` removes them). Writes nothing.
Needs numpy, h5py and hdf5plugin only: no Snakemake, no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import ShardError, StoreError
from .fingerprints import file_sha256
from .layout import INDEX_NAME, MANIFEST_NAME, RunLayout
from .prune import find_orphans, orphans_line
from .sampling import planned_sampling
from .store.format import TEMPERATURES_ATTR, read_attrs
from .store.identity import (
    FINGERPRINTS,
    fingerprint_conflicts,
    identity_mismatch,
    temperature_mismatch,
)
from .store.isolated import check_isolated, default_workers
from .store.validate import ForeignShard, ShardExpectation, open_shard, validate_shard
from .temperatures import planned_temperatures


def store_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name in (INDEX_NAME, MANIFEST_NAME) else path


def load_manifest(root: Path) -> dict:
    path = RunLayout(root).manifest
    if not path.is_file():
        raise StoreError(
            f"{path}: missing; point verify at the output_dir of a finished run (the folder "
            "holding index.h5 and manifest.json), or run the workflow to gather it"
        )
    try:
        manifest = json.loads(path.read_text())
        for entry in manifest["shards"]:
            entry["path"], entry["sha256"]  # noqa: B018 - the keys verify needs
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"{path}: unreadable or incomplete ({type(exc).__name__}: {exc}); copy it again "
            "from the original store, or rerun gather there to rewrite it"
        ) from None
    return manifest


def _regenerate(shard_path: str) -> str:
    return (
        "copy it again from the original store, or regenerate it where it was made with "
        "`snakemake --cores N <your usual --config/--configfile> --forcerun "
        f"<output_dir>/{shard_path}`"
    )


def checksum_problems(root: Path, manifest: dict, workers: int) -> list[str]:
    """One line per file that is missing, has another size, or another sha256."""
    files = [
        (entry["path"], entry["sha256"], entry.get("bytes"), True) for entry in manifest["shards"]
    ]
    index = manifest.get("index")
    if index:
        files.append((index["path"], index["sha256"], index.get("bytes"), False))

    def check(item):
        relative, expected, size, is_shard = item
        path = root / relative
        fix = (
            _regenerate(relative)
            if is_shard
            else (
                "copy it again from the original store, or rerun gather there "
                "(snakemake --cores N <your usual --config/--configfile> --forcerun gather)"
            )
        )
        if not path.is_file():
            return f"{relative}: missing; {fix}"
        if size is not None and path.stat().st_size != size:
            return (
                f"{relative}: {path.stat().st_size} bytes, manifest.json says {size} "
                f"(truncated or replaced); {fix}"
            )
        if file_sha256(path) != expected:
            return f"{relative}: sha256 differs from manifest.json (changed or damaged); {fix}"
        return None

    # hashlib releases the GIL on large blocks: threads hash files in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [line for line in pool.map(check, files) if line]


def _expected_from_index(root: Path, manifest: dict) -> tuple[dict, dict]:
    """Per shard: its sample ids and offsets, as index.h5 records them; and its attributes."""
    import h5py

    with h5py.File(RunLayout(root).index, "r", locking=False) as index:
        attrs = read_attrs(index)
        ids = index["sample_ids"][:]
        shard = index["sample_shard"][:]
        position = index["sample_position"][:]
        length = index["sample_length"][:]
    expected = {}
    for entry in manifest["shards"]:
        mine = np.flatnonzero(shard == entry["index"])
        order = mine[np.argsort(position[mine], kind="stable")]
        offsets = np.concatenate([[0], np.cumsum(length[order])]).astype(np.int64)
        expected[entry["index"]] = (ids[order], offsets)
    return expected, attrs


def deep_problems(root: Path, manifest: dict, workers: int) -> list[str]:
    """Re-validate every shard's contents in worker processes (a libhdf5 crash names the shard)."""
    try:
        expected, index_attrs = _expected_from_index(root, manifest)
    except Exception as exc:  # noqa: BLE001 - a damaged index is one more problem line
        return [
            f"{INDEX_NAME}: unreadable ({type(exc).__name__}: {exc}); copy it again or rerun gather"
        ]
    entries = {entry["index"]: entry for entry in manifest["shards"]}
    # Not num_shards: shards of appended data were written when the run had fewer.
    common = {
        key: manifest[key] for key in ("top_k", *FINGERPRINTS) if manifest.get(key) is not None
    }
    identity = common
    temperatures = planned_temperatures(manifest.get("settings"))
    masked_only = bool(index_attrs.get("masked_only", False))
    # Indexes from before temperatures were stored name none: those stores hold 1.0 only.
    index_wrong = identity_mismatch(index_attrs, common)
    if TEMPERATURES_ATTR in index_attrs:
        index_wrong += temperature_mismatch(index_attrs, temperatures)
    problems = [
        f"{INDEX_NAME}: {why}, from manifest.json (gathered from another run's shards?); rerun "
        "gather, or copy the store again"
        for why in index_wrong
    ]

    def check(index: int, progress):
        import h5py

        entry = entries[index]
        path = root / entry["path"]
        with open_shard(path) as handle:
            attrs = read_attrs(handle)
        if identity_mismatch(attrs, {**identity, "shard_index": index}):
            return ForeignShard(attrs)  # another run's shard: its contents do not matter
        sample_ids, offsets = expected[index]
        try:
            # No prepared tokens in a copied store: the shard's own ids are the reference,
            # and fletcher32 checksums vouch for them.
            with h5py.File(path, "r", locking=False) as handle:
                input_ids = handle["input_ids"][:]
                # Chat data: likewise its own loss mask, which says which rows it stores.
                loss_mask = handle["loss_mask"][:] if "loss_mask" in handle else None
        except Exception as exc:  # noqa: BLE001
            raise ShardError(f"input_ids unreadable ({type(exc).__name__}: {exc})") from None
        expectation = ShardExpectation(
            sample_ids=sample_ids,
            offsets=offsets,
            input_ids=input_ids,
            attrs={**common, "shard_index": index},
            vocab_size=manifest["vocab_size"],
            loss_mask=loss_mask,
            masked_only=masked_only,
            temperatures=temperatures,
            **planned_sampling(manifest.get("settings")),
        )
        summary = validate_shard(path, expectation, progress=progress)
        if summary.num_tokens != entry["num_tokens"] or summary.num_samples != entry["num_samples"]:
            raise ShardError(
                f"{summary.num_samples} samples / {summary.num_tokens} tokens, manifest.json says "
                f"{entry['num_samples']} / {entry['num_tokens']}"
            )
        return {key: summary.attrs.get(key) for key in common}

    found = {}
    for result in check_isolated(check, sorted(entries), workers):
        relative = entries[result.item]["path"]
        if isinstance(result.value, ForeignShard):
            found[result.item] = result.value.attrs
            wrong = identity_mismatch(result.value.attrs, {**identity, "shard_index": result.item})
            wrong += temperature_mismatch(result.value.attrs, temperatures)
            problems.append(
                f"{relative}: not the shard manifest.json lists ({'; '.join(wrong)}); "
                f"{_regenerate(relative)}"
            )
        elif result.error:
            problems.append(f"{relative}: {result.error}; {_regenerate(relative)}")
        else:
            found[result.item] = result.value
    mixed = [
        f"{sentence}; this store mixes runs: copy it again from the original store, or "
        "regenerate the odd shards where it was made"
        for sentence in fingerprint_conflicts(found, common, MANIFEST_NAME)
    ]
    return mixed + sorted(problems)


def verify(path: str | Path, deep: bool = False, workers: int | None = None) -> list[str]:
    """Every problem as one line; empty when the store is intact."""
    root = store_dir(path)
    workers = default_workers(workers)
    manifest = load_manifest(root)
    problems = checksum_problems(root, manifest, workers)
    if "index" not in manifest:
        print(
            f"note: {RunLayout(root).manifest} has no checksum of {INDEX_NAME} (gathered by an older "
            "version); rerun gather to add it",
            file=sys.stderr,
        )
    if deep:
        missing = {line.split(":", 1)[0] for line in problems if ": missing;" in line}
        present = {
            **manifest,
            "shards": [e for e in manifest["shards"] if e["path"] not in missing],
        }
        problems += deep_problems(root, present, workers)
    return problems


def main(argv: list[str] | None = None, prog: str = "python -m teacher_logits.verify") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check a gathered store against the sha256 checksums in its manifest.json.",
    )
    parser.add_argument("output_dir", help="the store: the folder with index.h5 and manifest.json")
    parser.add_argument(
        "--deep",
        action="store_true",
        help="also re-validate every shard's contents (slower: reads all data)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes/threads to use (default: the CPUs available, at most 8)",
    )
    args = parser.parse_args(argv)
    root = store_dir(args.output_dir)
    try:
        problems = verify(root, deep=args.deep, workers=args.workers)
    except StoreError as exc:
        print(exc)
        return 1
    for line in problems:
        print(line)
    orphans = find_orphans(RunLayout(root))
    if orphans.paths:  # not the store's problem: nothing reads them
        print(f"note: {orphans_line(orphans.summary(), str(root)).lstrip()}")
    if problems:
        print(f"{len(problems)} problem(s) in {root}")
        return 1
    manifest = load_manifest(root)
    print(
        f"OK: {root}: {len(manifest['shards'])} shards"
        f"{' and ' + INDEX_NAME if 'index' in manifest else ''} match manifest.json "
        f"(sha256){', contents valid' if args.deep else ''}; {manifest.get('num_samples')} samples, "
        f"{manifest.get('num_tokens')} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
