"""Hand a store to other trainers: ``teacher-logits export STORE OUT --format ...``.

``parquet``: one row per sample, ``sample_id``, ``input_ids``, ``topk_ids`` and
``topk_logprobs`` (logits - logsumexp: the full-vocabulary log-probabilities at
temperature 1), plus ``loss_mask`` (chat stores), ``row_stored`` (masked-only stores),
``sampled_ids``/``sampled_counts`` (sampled modes). ``datasets.load_dataset("parquet",
data_files=f"{OUT}/*.parquet")`` reads it; DistillKit-style trainers read the columns.

``axolotl``: the pre-tokenized rows axolotl's KD plugin trains on (what its
``kd.chat_template`` strategy would have produced, then ``DataCollatorForKD`` pads):
``input_ids``, ``attention_mask``, ``labels`` (the token, -100 where not trained),
``target_token_ids`` [T][k], ``target_logprobs`` [T][k] (the top-k renormalised, as that
strategy does) and ``target_mask`` [T][k] (1 on rows whose next token is trained). Row t
is the teacher's distribution over token t+1, as axolotl's loss pairs it with the
student's logits at t. Matched against axolotl ``AXOLOTL_MATCHED``.

One Parquet file per shard, written by a process pool, each streamed in row groups (a
worker holds one group), with the store's fingerprints in the file metadata
(``teacher_logits`` key: JSON). Files are written in ``OUT.partial/`` and the folder is renamed
to ``OUT`` when every file is there, so ``OUT`` is complete or absent; each file there is
itself written under a temporary name and renamed, so a rerun after a kill keeps the
finished files and writes the rest. Needs numpy, h5py and pyarrow, never torch.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError, UserError
from .layout import MANIFEST_NAME, PARTIAL_SUFFIX, export_file, partial_path

FORMATS = ("parquet", "axolotl")
AXOLOTL_MATCHED = "v0.18.0-9-g067b021c8 (commit 067b021c8b87a9e5e380b9173c704cf7340e30f5)"
# In ``OUT.partial/`` only: what the export is made from. A rerun reuses the finished
# files only when it agrees; OUT itself holds Parquet files alone, so that
# ``load_dataset(OUT)`` infers the format from them.
BEGUN_NAME = "export.json"
METADATA_KEY = b"teacher_logits"
# Samples per Parquet row group: what a worker holds in memory at once.
ROWS_PER_GROUP = 256
IGNORE_INDEX = -100  # Hugging Face's (and axolotl's) label to skip


@dataclass(frozen=True)
class ExportSettings:
    store_dir: Path
    out_dir: Path
    format: str = "parquet"
    overwrite: bool = False
    workers: int | None = None


def export(settings: ExportSettings) -> list[Path]:
    """Write the export; returns its Parquet files."""
    import pyarrow  # noqa: F401 - fail before any work when it is missing

    from .store.reader import LogitStore

    if settings.format not in FORMATS:
        raise ExportError(f"--format {settings.format}: use one of {', '.join(FORMATS)}")
    out = Path(settings.out_dir)
    _check_target(out, settings.overwrite)
    with LogitStore(settings.store_dir) as store:
        if settings.format == "axolotl" and store.top_k == 0:
            raise ExportError(
                f"{settings.store_dir} holds draws only (generation.mode: sampled) and no "
                "top-k; axolotl's KD plugin reads top-k logprobs: use --format parquet"
            )
        record = _record(store, settings.format)
        staging = _staging(out, record)
        shards = sorted(set(store.sample_shard.tolist()))
        todo = [s for s in shards if not export_file(staging, s).exists()]
        jobs = [(store, s, export_file(staging, s), settings.format, record) for s in todo]
        workers = min(len(jobs), settings.workers or min(os.cpu_count() or 1, 8))
        if workers <= 1:
            for job in jobs:
                _export_shard(*job)
        else:
            # fork: workers inherit the store's index; no torch is imported to make it unsafe
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                list(pool.map(_export_shard, *zip(*jobs)))
    _publish(staging, out)
    return [export_file(out, s) for s in shards]


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"{out} is not empty; export into a new or empty folder, or pass --overwrite "
            "to replace what is there"
        )


def _record(store, fmt: str) -> dict:
    """What the export is made from: its Parquet metadata and ``export.json``."""
    from . import __version__

    manifest = json.loads((Path(store.root) / MANIFEST_NAME).read_text())
    generation = manifest.get("settings", {}).get("generation", {})
    return {
        "format": fmt,
        "store": str(Path(store.root).resolve()),
        "teacher_logits_version": __version__,
        "num_samples": len(store),
        "num_tokens": int(store.num_tokens),
        "top_k": int(store.top_k),
        "vocab_size": store.vocab_size,
        "temperatures": list(store.temperatures),
        "mode": generation.get("mode", "topk"),
        "sample_temperature": generation.get("sample_temperature"),
        "has_loss_mask": bool(store.has_loss_mask),
        "masked_only": bool(store.masked_only),
        **{
            key: manifest.get(key)
            for key in (
                "format_version",
                "config_fingerprint",
                "teacher_fingerprint",
                "tokenizer_fingerprint",
                "tokenizer_content_fingerprint",
            )
        },
        # Which shard files: a store regenerated with the same shape and settings (edited
        # rows of equal length, say) is another store, and a rerun must not mix the two.
        "shards_sha256": hashlib.sha256(
            "".join(str(entry.get("sha256")) for entry in manifest["shards"]).encode()
        ).hexdigest(),
        **({"axolotl_matched": AXOLOTL_MATCHED} if fmt == "axolotl" else {}),
    }


def _staging(out: Path, record: dict) -> Path:
    """``OUT.partial/``: kept from a killed run of the same export (its finished files
    are reused), else made afresh. Half-written files are always removed."""
    staging = partial_path(out)
    begun = staging / BEGUN_NAME
    if staging.is_dir():
        try:
            same = json.loads(begun.read_text()) == record
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for half in staging.glob(f"*.parquet{PARTIAL_SUFFIX}"):
        half.unlink()
    begun.write_text(json.dumps(record))
    return staging


def _publish(staging: Path, out: Path) -> None:
    (staging / BEGUN_NAME).unlink()
    if out.is_dir():  # empty, or --overwrite: what was there goes only now
        shutil.rmtree(out)
    os.replace(staging, out)


def _export_shard(store, shard: int, path: Path, fmt: str, record: dict) -> None:
    import pyarrow.parquet as pq

    positions = np.flatnonzero(store.sample_shard == shard)
    positions = positions[np.argsort(store.sample_position[positions])]  # the file's order
    temp = partial_path(path)
    metadata = {METADATA_KEY: json.dumps({**record, "shard": int(shard)}).encode()}
    writer = None
    try:
        for first in range(0, len(positions), ROWS_PER_GROUP):
            records = [store[int(i)] for i in positions[first : first + ROWS_PER_GROUP]]
            table = (_axolotl_table if fmt == "axolotl" else _parquet_table)(records)
            table = table.replace_schema_metadata(metadata)
            if writer is None:
                writer = pq.ParquetWriter(temp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    os.replace(temp, path)


def _lists(rows: list[np.ndarray], arrow_type):
    """A list column from per-sample arrays; 2-D arrays become lists of lists."""
    import pyarrow as pa

    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(rows) if rows else np.zeros(0)
    if flat.ndim == 2:
        width = flat.shape[1]
        inner = pa.ListArray.from_arrays(
            pa.array(np.arange(0, flat.size + 1, width, dtype=np.int32)),
            pa.array(flat.reshape(-1), type=arrow_type),
        )
        return pa.ListArray.from_arrays(pa.array(offsets), inner)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=arrow_type))


def _parquet_table(records: list[dict]):
    import pyarrow as pa

    columns = {"sample_id": pa.array([r["sample_id"] for r in records], type=pa.int64())}
    columns["input_ids"] = _lists([r["input_ids"] for r in records], pa.int32())
    if "topk_ids" in records[0]:
        columns["topk_ids"] = _lists([r["topk_ids"] for r in records], pa.int32())
        columns["topk_logprobs"] = _lists([topk_logprobs(r) for r in records], pa.float32())
    for name, arrow_type in (
        ("loss_mask", pa.uint8()),
        ("row_stored", pa.uint8()),
        ("sampled_ids", pa.int32()),
        ("sampled_counts", pa.uint8()),
    ):
        if name in records[0]:
            columns[name] = _lists([r[name] for r in records], arrow_type)
    return pa.table(columns)


def topk_logprobs(record: dict) -> np.ndarray:
    """float32 [T, k]: the stored logits minus the row's full-vocabulary logsumexp."""
    logits = record["topk_logits"].astype(np.float32)
    return (logits - record["logsumexp"].astype(np.float32)[:, None]).astype(np.float32)


def axolotl_rows(record: dict) -> dict:
    """One sample as axolotl's KD strategy emits it (numpy arrays, per position)."""
    tokens = record["input_ids"].astype(np.int64)
    trained = record.get("loss_mask", np.ones(len(tokens), dtype=np.uint8)).astype(bool)
    labels = np.where(trained, tokens, IGNORE_INDEX)
    # Row t is trained when token t+1 is: the last row predicts nothing.
    row_trained = np.append(trained[1:], False)
    logits = record["topk_logits"].astype(np.float32)
    top = logits.max(axis=1, keepdims=True)
    renormalised = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
    k = logits.shape[1]
    return {
        "input_ids": tokens,
        "attention_mask": np.ones(len(tokens), dtype=np.int64),
        "labels": labels,
        "target_token_ids": record["topk_ids"].astype(np.int64),
        "target_logprobs": renormalised.astype(np.float32),
        "target_mask": np.repeat(row_trained[:, None], k, axis=1).astype(np.int64),
    }


def _axolotl_table(records: list[dict]):
    import pyarrow as pa

    rows = [axolotl_rows(r) for r in records]
    types = {"target_logprobs": pa.float32()}
    return pa.table(
        {name: _lists([row[name] for row in rows], types.get(name, pa.int64())) for name in rows[0]}
    )


def main(argv: list[str] | None = None, prog: str = "python -m teacher_logits.export") -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a store as Parquet files for other trainers (one row per sample).",
    )
    parser.add_argument("store", help="the store: the folder with index.h5 and manifest.json")
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what OUT holds (once the export is done)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: the CPUs, at most 8)"
    )
    args = parser.parse_args(argv)
    settings = ExportSettings(
        store_dir=Path(args.store),
        out_dir=Path(args.out),
        format=args.format,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    try:
        files = export(settings)
    except (UserError, FileNotFoundError) as exc:
        print(f"export: {exc}")
        return 1
    except ModuleNotFoundError as exc:
        print(f"export: {exc.name} is needed for exports: pip install pyarrow")
        return 1
    print(
        f"{settings.out_dir}: {len(files)} Parquet files ({args.format}) from {settings.store_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
