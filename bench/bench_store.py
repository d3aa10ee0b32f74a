"""Storage, gather and reader benchmarks (4, 5 and 7 of bench/README.md).

    python bench/bench_store.py [--quick]

Numbers come from the demo teacher (a small trained Llama, vocab 2048) on the
demo corpus: random weights give near-uniform top-k ids that no codec shrinks.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import blosc2
import h5py
import numpy as np

# This folder (for common) and the repository (for teacher_logits), before any import
# of either: the benchmarks run from a plain checkout.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import teacher_logits.store.chunks as shard_chunks
import teacher_logits.store.writer as shard_writer
from teacher_logits import LogitStore
from teacher_logits.layout import RunLayout
from teacher_logits.store.codec import decode_topk, encode_topk
from teacher_logits.store.format import COMPRESSIONS
from teacher_logits.store.prepared import read_prepared
from teacher_logits.store.writer import ShardWriter

from common import (  # noqa: E402
    BENCH_SHARD_ATTRS,
    BIG_VOCAB,
    DEMO_DIR,
    NAIVE_BYTES_PER_TOKEN,
    Timer,
    demo_assets,
    emit,
    id_floor_bytes_per_token,
    machine,
    prepared_shard,
    table,
    vocab_proxies,
)

TOP_K = 64


def demo_rows(num_docs: int):
    """Token ids of the first demo documents and the demo teacher's top-k of them."""
    import torch
    from transformers import AutoTokenizer  # noqa: I001

    from teacher_logits.generation.compute import compute_window
    from teacher_logits.generation.teacher import TopKHead, load_teacher

    teacher = demo_assets() / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    texts = [
        json.loads(line)["text"]
        for line in (DEMO_DIR / "corpus.jsonl").read_text().splitlines()[:num_docs]
    ]
    token_lists = [ids[:2048] for ids in tokenizer(texts)["input_ids"] if ids]
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    input_ids = np.concatenate(token_lists).astype(np.int32)
    # bfloat16: the workflow's default teacher dtype, as `make demo` runs it.
    model = load_teacher(str(teacher), dtype="bfloat16")
    head = TopKHead(model, TOP_K)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with torch.inference_mode():
        rows = compute_window(head, input_ids, offsets, 4096, int(model.config.pad_token_id or 0))
    rows["topk_logits"] = rows["topk_logits"].astype(np.float16)
    rows["entropy"] = rows["entropy"].astype(np.float16)
    return lengths, input_ids, rows, int(model.config.vocab_size)


@contextmanager
def rank_order_layout():
    """Write top-k rows as they come (format version 1's layout) for comparison."""
    saved = shard_writer.encode_topk
    shard_writer.encode_topk = lambda ids, values: (ids, values)
    try:
        yield
    finally:
        shard_writer.encode_topk = saved


def write_shard(path, lengths, input_ids, rows, compression, sample_ids=None, cls=ShardWriter):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    writer = cls(path, len(lengths), int(offsets[-1]), TOP_K, compression=compression)
    writer.add_samples(np.arange(len(lengths)) if sample_ids is None else sample_ids, lengths)
    step = 1 << 14
    for r0 in range(0, int(offsets[-1]), step):
        block = {k: v[r0 : r0 + step] for k, v in rows.items()}
        block["input_ids"] = input_ids[r0 : r0 + step]
        writer.write_rows(block)
    writer.commit(BENCH_SHARD_ATTRS)


def read_all(path, decode: bool) -> None:
    with h5py.File(path, "r") as f:
        n = f["logsumexp"].shape[0]
        for r0 in range(0, n, 4096):
            ids, values = f["topk_ids"][r0 : r0 + 4096], f["topk_logits"][r0 : r0 + 4096]
            f["logsumexp"][r0 : r0 + 4096]
            if decode:
                decode_topk(ids, values)


class BaselineWriter(ShardWriter):
    """The writer before chunks were compressed outside HDF5: its flush loop, verbatim, so
    ``write_speedup`` compares both on the same rows in the same run."""

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        block = {n: np.concatenate([p[n] for p in self._pending]) for n in self._pending[0]}
        chunk = shard_writer.CHUNK_ROWS
        count = self._pending_rows if final else self._pending_rows // chunk * chunk
        r0 = self._written
        if "topk_ids" in block:
            block["topk_ids"][:count], block["topk_logits"][:count] = encode_topk(
                block["topk_ids"][:count], block["topk_logits"][:count]
            )
        for name, values in block.items():
            self._file[name][r0 : r0 + count] = values[:count]
        self._written += count
        self._pending_rows -= count
        self._pending = [{n: v[count:] for n, v in block.items()}] if self._pending_rows else []


@contextmanager
def chunk_settings(threads=None, ids=None, values=None):
    """Run the default writer with another pool size or other Blosc2 settings."""
    saved = shard_chunks.compress_threads, dict(shard_chunks.CODECS), shard_chunks.VALUES_CODEC
    if threads is not None:
        shard_chunks.compress_threads = lambda: threads
    if ids is not None:
        shard_chunks.CODECS["topk_ids"] = ids
    if values is not None:
        shard_chunks.VALUES_CODEC = values
    try:
        yield
    finally:
        shard_chunks.compress_threads = saved[0]
        shard_chunks.CODECS.clear()
        shard_chunks.CODECS.update(saved[1])
        shard_chunks.VALUES_CODEC = saved[2]


def dataset_bytes(path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name].id.get_storage_size() for name in f}


def codec_options(by_vocab: dict, tokens: int) -> list[dict]:
    """Blosc2 settings per dataset on the stored (encoded) rows: B/token and one thread's
    compression speed, chunk by chunk as the writer compresses them."""
    codec = shard_chunks.ChunkCodec
    bitshuffle = blosc2.Filter.BITSHUFFLE
    options = {
        "zstd 5, byte shuffle (before)": codec(5),
        "zstd 5, bit shuffle": codec(5, shuffle=bitshuffle),
        "zstd 1, byte shuffle": codec(1),
        "zstd 1, bit shuffle": codec(1, shuffle=bitshuffle),
        "zstd 2, byte shuffle, chunk-sized block": codec(2, whole_chunk_block=True),
        "zstd 5, byte shuffle, chunk-sized block": codec(5, whole_chunk_block=True),
    }
    step = shard_writer.CHUNK_ROWS
    results = []
    for vocab, rows in by_vocab.items():
        ids, values = encode_topk(rows["topk_ids"], rows["topk_logits"])
        stored = {"topk_ids": ids, "topk_logits": values, "logsumexp": rows["logsumexp"]}
        stored["entropy"] = rows["entropy"]
        for option, settings in options.items():
            result = {"vocab": vocab, "option": option}
            for name, array in stored.items():
                with Timer() as t:
                    size = sum(
                        len(shard_chunks.compress_chunk(array[r0 : r0 + step], step, settings))
                        for r0 in range(0, len(array), step)
                    )
                result[name] = size / tokens
                result[f"{name}_tokens_per_s"] = tokens / t.seconds
            results.append(result)
    return results


def vocab_storage(folder, lengths, input_ids, by_vocab: dict) -> list[dict]:
    """The default writer's shard at each vocabulary: file and per-dataset bytes/token."""
    tokens = len(input_ids)
    results = []
    for n, (vocab, rows) in enumerate(by_vocab.items()):
        path = folder / f"vocab_{n}.h5"
        write_shard(path, lengths, input_ids, rows, "default")
        sizes = dataset_bytes(path)
        size = path.stat().st_size
        big = vocab.startswith("128k")
        results.append(
            {
                "vocab": vocab,
                "bytes_per_token": size / tokens,
                "fraction_of_naive": size / tokens / NAIVE_BYTES_PER_TOKEN,
                "id_bytes_per_token": sizes["topk_ids"] / tokens,
                "value_bytes_per_token": sizes["topk_logits"] / tokens,
                "id_floor_bytes_per_token": id_floor_bytes_per_token(
                    BIG_VOCAB if big else int(vocab.replace(",", "")), TOP_K
                ),
            }
        )
    return results


def writer_throughput(folder, lengths, input_ids, rows, repeats: int) -> list[dict]:
    """Tokens/s of the writer before (HDF5 compresses, one thread) and now, best of
    ``repeats`` each, interleaved so that load from elsewhere hits all alike."""
    tokens = len(input_ids)
    codec = shard_chunks.ChunkCodec
    variants = [
        ("before: HDF5 filter, zstd 5, 1 thread", {}, BaselineWriter),
        ("pool of 1, today's levels", {"threads": 1}, ShardWriter),
        ("pool of 1, zstd 5 everywhere", {"threads": 1, "ids": codec(5), "values": codec(5)}, None),
        (
            "pool of 1, Blosc2 with 2 threads",
            {
                "threads": 1,
                "ids": codec(2, whole_chunk_block=True, nthreads=2),
                "values": codec(1, nthreads=2),
            },
            None,
        ),
        ("pool of 2", {"threads": 2}, None),
        ("pool of 4", {"threads": 4}, None),
        (f"default (pool of {shard_chunks.compress_threads()})", {}, ShardWriter),
    ]
    best = {name: float("inf") for name, _, _ in variants}
    sizes = {}
    for _ in range(repeats):
        for n, (name, settings, cls) in enumerate(variants):
            path = folder / f"write_{n}.h5"
            with chunk_settings(**settings), Timer() as t:
                write_shard(path, lengths, input_ids, rows, "default", cls=cls or ShardWriter)
            best[name] = min(best[name], t.seconds)
            sizes[name] = path.stat().st_size / tokens
            path.unlink()
    baseline = best[variants[0][0]]
    return [
        {
            "writer": name,
            "tokens_per_s": tokens / best[name],
            "speedup": baseline / best[name],
            "bytes_per_token": sizes[name],
        }
        for name, _, _ in variants
    ]


def storage_options(folder, lengths, input_ids, rows):
    tokens = len(input_ids)
    naive_mb = tokens * NAIVE_BYTES_PER_TOKEN / 1e6
    variants = [("rank order (format 1)", c, True) for c in ("none", "zstd")]
    variants += [("sorted id deltas", c, False) for c in COMPRESSIONS]
    results = []
    for layout, compression, rank in variants:
        path = folder / f"{layout.split()[0]}_{compression}.h5"
        with Timer() as w:
            if rank:
                with rank_order_layout():
                    write_shard(path, lengths, input_ids, rows, compression)
            else:
                write_shard(path, lengths, input_ids, rows, compression)
        with Timer() as r:
            read_all(path, decode=not rank)
        with h5py.File(path, "r") as f:
            topk = sum(f[n].id.get_storage_size() for n in ("topk_ids", "topk_logits", "logsumexp"))
        size = path.stat().st_size
        results.append(
            {
                "layout": layout,
                "compression": compression,
                "bytes_per_token": size / tokens,
                "topk_lse_bytes_per_token": topk / tokens,
                "fraction_of_naive": size / tokens / NAIVE_BYTES_PER_TOKEN,
                "write_mb_per_s": naive_mb / w.seconds,
                "read_mb_per_s": naive_mb / r.seconds,
            }
        )
    return results


def build_store(folder, lengths, input_ids, rows, vocab, num_shards=4):
    """prepare's files + shards + gather's index: a store as the workflow leaves it."""
    from teacher_logits.gather import gather

    layout = prepared_shard(
        RunLayout(folder), lengths, vocab, TOP_K, num_shards=num_shards, input_ids=input_ids
    )
    prepared = read_prepared(layout.tokens)
    plan = json.loads(layout.plan.read_text())
    for shard in range(num_shards):
        sample_ids, offsets, ids = prepared.shard_slice(shard)
        r0 = int(prepared.offsets[prepared.shard_bounds[shard]])
        block = {k: v[r0 : r0 + len(ids)] for k, v in rows.items()}
        path = layout.shard(shard)
        write_shard(path, np.diff(offsets), ids, block, "default", sample_ids)
        with h5py.File(path, "r+") as f:
            f.attrs["shard_index"], f.attrs["num_shards"] = shard, num_shards
    layout.plan.write_text(json.dumps(plan))
    with Timer() as t:
        gather(layout)
    return folder, t.seconds


def read_random(store_dir, seconds: float, seed=0) -> tuple[float, int]:
    store = LogitStore(store_dir)
    order = np.random.default_rng(seed).permutation(len(store))
    tokens, samples, start = 0, 0, time.perf_counter()
    for i in order:
        tokens += len(store[int(i)]["input_ids"])
        samples += 1
        if time.perf_counter() - start > seconds:
            break
    store.close()
    return tokens / (time.perf_counter() - start), samples


def read_loader(store_dir, workers: int) -> float:
    from torch.utils.data import DataLoader

    from teacher_logits.training import collate

    store = LogitStore(store_dir)
    loader = DataLoader(store, batch_size=16, shuffle=True, num_workers=workers, collate_fn=collate)
    tokens, start = 0, time.perf_counter()
    for batch in loader:
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_store_"))
    with Timer() as t:
        lengths, input_ids, rows, vocab = demo_rows(700 if args.quick else 2000)
    tokens = len(input_ids)
    print(
        f"demo teacher top-{TOP_K} of {len(lengths)} demo documents, {tokens} tokens "
        f"(mean length {lengths.mean():.0f}) in {t.seconds:.0f} s"
    )

    storage = storage_options(work / "storage", lengths, input_ids, rows)
    table(
        f"Storage at k={TOP_K} on {machine()}: demo teacher (trained Llama, vocab {vocab}), "
        f"demo corpus, teacher in bfloat16; naive = {NAIVE_BYTES_PER_TOKEN} B/token (int32 ids, float16 values, "
        "float32 logsumexp); MB/s of naive bytes; default compresses in a pool of "
        f"{shard_chunks.compress_threads()} threads, the others in HDF5 (one thread)",
        [
            "layout",
            "compression",
            "B/token (file)",
            "of naive",
            "top-k+lse B/token",
            "write MB/s",
            "read MB/s",
        ],
        [
            [
                s["layout"],
                s["compression"],
                s["bytes_per_token"],
                f"{s['fraction_of_naive']:.1%}",
                s["topk_lse_bytes_per_token"],
                s["write_mb_per_s"],
                s["read_mb_per_s"],
            ]
            for s in storage
        ],
    )
    default = next(
        s for s in storage if s["layout"] == "sorted id deltas" and s["compression"] == "default"
    )

    # Real vocabularies: the same rows at 128,256 ids (proxies a and b).
    by_vocab = vocab_proxies(rows, vocab)
    options = codec_options(by_vocab, tokens)
    datasets = ("topk_ids", "topk_logits", "logsumexp", "entropy")
    table(
        "Blosc2 settings per dataset (B/token of each stored dataset; compression k tokens/s, "
        "one thread, chunks of the writer)",
        [
            "vocabulary",
            "setting",
            "ids",
            "values",
            "lse",
            "entropy",
            "ids k tok/s",
            "values k tok/s",
        ],
        [
            [
                o["vocab"],
                o["option"],
                *(o[name] for name in datasets),
                o["topk_ids_tokens_per_s"] / 1e3,
                o["topk_logits_tokens_per_s"] / 1e3,
            ]
            for o in options
        ],
    )
    vocabs = vocab_storage(work / "storage", lengths, input_ids, by_vocab)
    table(
        f"Default storage by vocabulary (same rows; naive = {NAIVE_BYTES_PER_TOKEN} B/token at "
        "every vocabulary; floor = log2(C(vocab, 64))/8, a uniformly random 64-id set)",
        ["vocabulary", "B/token (file)", "of naive", "ids B/token", "id floor", "values B/token"],
        [
            [
                v["vocab"],
                v["bytes_per_token"],
                f"{v['fraction_of_naive']:.1%}",
                v["id_bytes_per_token"],
                v["id_floor_bytes_per_token"],
                v["value_bytes_per_token"],
            ]
            for v in vocabs
        ],
    )
    random_proxy, ordered_proxy = vocabs[1], vocabs[2]
    writers = writer_throughput(work / "storage", lengths, input_ids, rows, 5 if args.quick else 7)
    table(
        f"Shard writer, default compression, {tokens:,} tokens at vocab {vocab} on {machine()} "
        "(best of runs interleaved in one process)",
        ["writer", "tokens/s", "speedup", "B/token (file)"],
        [[w["writer"], w["tokens_per_s"], w["speedup"], w["bytes_per_token"]] for w in writers],
    )
    new_writer = writers[-1]

    # Chunk layout: random-order reads against bytes per token.
    layouts = []
    saved = shard_writer.CHUNK_ROWS
    for chunk_rows in (256, 1024, 4096):
        shard_writer.CHUNK_ROWS = chunk_rows
        try:
            folder, gather_s = build_store(
                work / f"store_{chunk_rows}", lengths, input_ids, rows, vocab
            )
        finally:
            shard_writer.CHUNK_ROWS = saved
        size = sum(p.stat().st_size for p in RunLayout(folder).shards_dir.glob("*.h5"))
        tps, samples = read_random(folder, 6 if args.quick else 20)
        layouts.append(
            {
                "chunk_rows": chunk_rows,
                "bytes_per_token": size / tokens,
                "reader_tokens_per_s": tps,
                "samples_read": samples,
                "gather_tokens_per_s": tokens / gather_s,
                "folder": str(folder),
            }
        )
    table(
        "Random-order reads (LogitStore, one process) by HDF5 chunk rows",
        ["chunk rows", "B/token", "reader tokens/s", "gather tokens/s"],
        [
            [
                c["chunk_rows"],
                c["bytes_per_token"],
                c["reader_tokens_per_s"],
                c["gather_tokens_per_s"],
            ]
            for c in layouts
        ],
    )
    chosen = next(c for c in layouts if c["chunk_rows"] == saved)
    loader_tps = read_loader(chosen["folder"], 4)
    print(
        f"  chunk rows in use: {saved}; DataLoader, 4 workers, batch 16: {loader_tps:,.0f} tokens/s"
    )

    emit(
        {
            "bench": "store",
            "machine": machine(),
            "tokens": tokens,
            "mean_sample_length": float(lengths.mean()),
            "storage": storage,
            "storage_fraction_of_naive": default["fraction_of_naive"],
            "storage_bytes_per_token": default["bytes_per_token"],
            "storage_read_mb_per_s": default["read_mb_per_s"],
            "storage_write_mb_per_s": default["write_mb_per_s"],
            "vocab_storage": vocabs,
            "codec_options": options,
            "storage_fraction_of_naive_128k": random_proxy["fraction_of_naive"],
            "storage_fraction_of_naive_128k_ordered": ordered_proxy["fraction_of_naive"],
            "storage_bytes_per_token_128k": random_proxy["bytes_per_token"],
            "id_floor_bytes_per_token_128k": random_proxy["id_floor_bytes_per_token"],
            "id_bytes_per_token_128k": random_proxy["id_bytes_per_token"],
            "writers": writers,
            "write_speedup": new_writer["speedup"],
            "write_tokens_per_s": new_writer["tokens_per_s"],
            "write_threads": shard_chunks.compress_threads(),
            "chunk_layouts": [{k: v for k, v in c.items() if k != "folder"} for c in layouts],
            "chunk_rows": saved,
            "gather_tokens_per_s": chosen["gather_tokens_per_s"],
            "reader_tokens_per_s": chosen["reader_tokens_per_s"],
            "reader_loader4_tokens_per_s": loader_tps,
        }
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
