"""What the cross-tokenizer fields (text, token byte offsets, target_logprob) cost on disk.

The demo teacher's rows of the first demo documents are written twice with the shard
writer, with and without the fields, at the demo vocabulary (2k ids) and at the ordered
128k-id proxy of the same rows (``common.vocab_proxies``); the difference per token is
what the fields add. Their own bytes do not depend on the ids' numbering (the text, the
spans and the log-probabilities are the same under a relabelling), so the two sizes
differ only through how the shard's other datasets compress.

    .venv/bin/python bench/bench_cross_fields.py [--docs 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from teacher_logits.store.writer import ShardWriter  # noqa: E402

from common import DEMO_DIR, demo_assets, vocab_proxies  # noqa: E402

TOP_K = 64
FIELDS = ("text_bytes", "text_offsets", "token_offsets", "target_logprob")


def demo_rows(num_docs: int):
    """The texts, token ids, byte spans and the teacher's rows (with target_logprob)."""
    import torch
    from transformers import AutoTokenizer

    from teacher_logits.generation.compute import compute_window, next_token_targets
    from teacher_logits.generation.teacher import TopKHead, load_teacher
    from teacher_logits.token_offsets import TokenOffsets
    from teacher_logits.tokenization import Tokenization

    teacher = demo_assets() / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    lines = (DEMO_DIR / "corpus.jsonl").read_text().splitlines()[:num_docs]
    work = Tokenization(tokenizer, 2048, "truncate", offsets=TokenOffsets(tokenizer))
    tokens = work.batch(0, [json.loads(line)["text"] for line in lines])
    offsets = np.concatenate([[0], np.cumsum(tokens["lengths"])])
    model = load_teacher(str(teacher), dtype="bfloat16")
    head = TopKHead(model, TOP_K)
    targets = next_token_targets(tokens["input_ids"], offsets)
    with torch.inference_mode():
        rows = compute_window(head, tokens["input_ids"], offsets, 4096, 0, targets=targets)
    rows["topk_logits"] = rows["topk_logits"].astype(np.float16)
    rows["entropy"] = rows["entropy"].astype(np.float16)
    rows["input_ids"] = tokens["input_ids"]
    rows["token_offsets"] = tokens["token_offsets"]
    texts = [t.encode() for t in tokens["texts"]]
    text = (
        np.frombuffer(b"".join(texts), dtype=np.uint8),
        np.concatenate([[0], np.cumsum([len(t) for t in texts])]),
    )
    return tokens["lengths"], rows, text


def shard_bytes(path: Path, lengths, rows: dict, text) -> dict:
    writer = ShardWriter(path, len(lengths), int(lengths.sum()), TOP_K, text=text)
    writer.add_samples(np.arange(len(lengths)), lengths)
    names = [n for n in rows if text is not None or n not in ("token_offsets", "target_logprob")]
    step = 1 << 14
    for r0 in range(0, int(lengths.sum()), step):
        writer.write_rows({n: rows[n][r0 : r0 + step] for n in names})
    writer.commit({})
    with h5py.File(path, "r") as handle:
        sizes = {n: int(handle[n].id.get_storage_size()) for n in FIELDS if n in handle}
    return {"file": path.stat().st_size, **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300)
    args = parser.parse_args()
    lengths, rows, text = demo_rows(args.docs)
    tokens = int(lengths.sum())
    report = {"tokens": tokens, "text_bytes_per_token": round(len(text[0]) / tokens, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, proxy in vocab_proxies(rows, 2048).items():
            if "random" in name:
                continue
            plain = shard_bytes(Path(tmp) / "plain.h5", lengths, proxy, None)
            cross = shard_bytes(Path(tmp) / "cross.h5", lengths, proxy, text)
            report[name] = {
                "bytes_per_token_without": round(plain["file"] / tokens, 2),
                "bytes_per_token_added": round((cross["file"] - plain["file"]) / tokens, 2),
                **{f"{n}_per_token": round(cross[n] / tokens, 2) for n in FIELDS},
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
