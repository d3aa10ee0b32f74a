"""Shards at real vocabularies, written by the parallel chunk writer (store/chunks.py).

The default compression's row chunks are compressed outside HDF5 and written with
``write_direct_chunk``; these tests read them back through plain h5py (the normal
Blosc2 + Fletcher-32 filters, as any reader does) and compare every dataset bit for
bit with the same rows written through HDF5's own filter pipeline.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import blosc2
import h5py
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import teacher_logits.store.writer as shard_writer  # noqa: E402
from teacher_logits.store.chunks import (  # noqa: E402
    _cparams,
    _frame_template,
    codec_for,
    compress_chunk,
    fletcher32,
)
from teacher_logits.store.codec import decode_topk, encode_topk  # noqa: E402
from teacher_logits.store.format import compression_options, needed_rows  # noqa: E402
from teacher_logits.store.reader import read_sample  # noqa: E402
from teacher_logits.store.writer import ShardWriter  # noqa: E402

BIG_VOCAB = 128256
ATTRS = {
    "shard_index": 0,
    "num_shards": 1,
    "teacher_fingerprint": "t",
    "tokenizer_fingerprint": "k",
    "config_fingerprint": "c",
    "cuda_visible_devices": "",
    "hostname": "h",
    "started_at": 1.0,
    "finished_at": 2.0,
    "versions": {},
    "claims": [],
}


def make_rows(num_tokens: int, top_k: int, vocab: int, seed: int = 0) -> dict:
    """Rank-ordered top-k rows with exact ties, ids across the whole vocabulary."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, top_k, replace=False) for _ in range(num_tokens)])
    ids[0, :2] = [0, vocab - 1]  # both ends of the vocabulary
    # Few distinct values: many exact ties, which rank by ascending id.
    values = -np.sort(-rng.choice([7.5, 2.0, 2.0, 0.0, -1.25, -30.0], (num_tokens, top_k)), axis=1)
    values = values.astype(np.float16)
    for t in range(num_tokens):
        order = np.lexsort((ids[t], -values[t].astype(np.float32)))
        ids[t], values[t] = ids[t][order], values[t][order]
    rows = {
        "input_ids": rng.integers(0, vocab, num_tokens).astype(np.int32),
        "topk_ids": ids.astype(np.int32),
        "topk_logits": values,
        "logsumexp": (values[:, 0].astype(np.float32) + rng.uniform(0.1, 3, num_tokens)).astype(
            np.float32
        ),
        "entropy": rng.uniform(0, 5, num_tokens).astype(np.float16),
    }
    rows["logsumexp"][: num_tokens // 3] = 0.0  # an all-zero chunk is Blosc2's special case
    return rows


def lengths_for(num_tokens: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < num_tokens:
        lengths.append(int(min(rng.integers(1, 90), num_tokens - sum(lengths))))
    return np.array(lengths, dtype=np.int64)


def write(path, rows, compression="default", *, temperatures=(1.0,), loss_mask=None, **options):
    """A shard of ``rows`` written in blocks of odd sizes (rows straddle chunk edges)."""
    num_tokens = len(rows["input_ids"])
    lengths = lengths_for(num_tokens)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    masked_only = options.pop("masked_only", False)
    writer = ShardWriter(
        path,
        len(lengths),
        num_tokens,
        rows["topk_ids"].shape[1],
        compression=compression,
        temperatures=temperatures,
        with_loss_mask=loss_mask is not None,
        stored_rows=needed_rows(loss_mask, offsets) if masked_only else None,
        **options,
    )
    writer.add_samples(np.arange(len(lengths)) * 3, lengths)
    extra = {f"logsumexp_t{t!r}": rows["logsumexp"] / t for t in temperatures if t != 1.0}
    if loss_mask is not None:
        extra["loss_mask"] = loss_mask
    r0, sizes = 0, [1, 37, 5, 300, 64, 999, 2]
    try:
        while r0 < num_tokens:
            r1 = min(num_tokens, r0 + sizes[r0 % len(sizes)])
            writer.write_rows({k: v[r0:r1] for k, v in {**rows, **extra}.items()})
            r0 = r1
        return writer.commit(ATTRS)
    except BaseException:
        writer.abort()
        raise


def contents(path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: (f[name][()], dict(f[name].attrs)) for name in f}


def assert_same_contents(path, reference) -> None:
    got, want = contents(path), contents(reference)
    assert got.keys() == want.keys()
    for name, (array, attrs) in want.items():
        assert got[name][0].dtype == array.dtype, name
        np.testing.assert_array_equal(got[name][0].view(np.uint8), array.view(np.uint8), name)
        assert got[name][1] == attrs, name


def assert_written_directly(path) -> None:
    """Each row dataset's first chunk holds exactly what the chunk writer makes of its rows."""
    with h5py.File(path, "r") as f:
        for name in ("topk_ids", "topk_logits", "logsumexp"):
            dataset = f[name]
            rows = dataset.chunks[0]
            _, stored = dataset.id.read_direct_chunk((0,) * dataset.ndim)
            assert stored == compress_chunk(dataset[:rows], rows, codec_for(name)), name


OPTIONS = {
    "plain": {},
    "float32 values": {"value_dtype": "float32"},
    "no entropy": {"with_entropy": False},
    "temperatures": {"temperatures": (1.0, 0.5, 2.0)},
    "loss mask": {"loss_mask": True},
    "masked only": {"loss_mask": True, "masked_only": True},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_direct_chunks_read_back_as_hdf5_would_have_written_them(tmp_path, monkeypatch, option):
    # Small chunks: many of them, rows straddling every edge, a partial last one.
    monkeypatch.setattr(shard_writer, "CHUNK_ROWS", 16)
    rows = make_rows(389, 8, BIG_VOCAB, seed=len(option))
    options = dict(OPTIONS[option])
    if options.pop("loss_mask", False):
        options["loss_mask"] = (np.random.default_rng(2).random(389) < 0.6).astype(np.uint8)
    path = write(tmp_path / "direct.h5", rows, **options)
    # "zstd" goes through HDF5's own filters: the same rows, encoded the same way.
    reference = write(tmp_path / "hdf5.h5", rows, "zstd", **options)
    assert_same_contents(path, reference)
    assert_written_directly(path)


def test_a_128k_shard_at_full_chunk_size_reads_back_in_rank_order(tmp_path):
    rows = make_rows(2500, 64, BIG_VOCAB, seed=5)
    path = write(tmp_path / "s.h5", rows)
    assert_same_contents(path, write(tmp_path / "hdf5.h5", rows, "zstd"))
    assert_written_directly(path)
    lengths = lengths_for(2500)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with h5py.File(path, "r") as f:
        assert f["topk_ids"].chunks == (1024, 64)
        for position in (0, len(lengths) // 2, len(lengths) - 1):
            record = read_sample(f, position)
            a, b = offsets[position], offsets[position + 1]
            np.testing.assert_array_equal(record["topk_ids"], rows["topk_ids"][a:b])
            np.testing.assert_array_equal(record["topk_logits"], rows["topk_logits"][a:b])


def test_codec_round_trips_at_a_128k_vocabulary_with_ties():
    rows = make_rows(300, 64, BIG_VOCAB, seed=9)
    deltas, by_id = encode_topk(rows["topk_ids"], rows["topk_logits"])
    assert deltas.dtype == np.int32 and (deltas[:, 1:] >= 1).all()
    ids, values = decode_topk(deltas, by_id)
    assert ids.max() == BIG_VOCAB - 1 and ids.min() == 0
    np.testing.assert_array_equal(ids, rows["topk_ids"])
    np.testing.assert_array_equal(values.view(np.uint16), rows["topk_logits"].view(np.uint16))


def test_tiny_shard_and_a_shard_that_keeps_no_rows(tmp_path):
    rows = make_rows(5, 8, BIG_VOCAB)
    path = write(tmp_path / "tiny.h5", rows)  # one chunk of 5 rows
    assert_same_contents(path, write(tmp_path / "tiny_hdf5.h5", rows, "zstd"))
    # Masked-only with nothing trained on: row datasets of 0 rows, no chunk to write.
    path = write(tmp_path / "none.h5", rows, loss_mask=np.zeros(5, np.uint8), masked_only=True)
    with h5py.File(path, "r") as f:
        assert f["topk_ids"].shape == (0, 8) and f["logsumexp"].shape == (0,)


@pytest.mark.parametrize("name", ["topk_ids", "topk_logits", "logsumexp", "entropy"])
def test_assembled_frames_are_blosc2s_own(name):
    # compress_chunk builds frames from a template; Blosc2 building them gives the same bytes.
    rows = make_rows(1024, 64, BIG_VOCAB, seed=4)
    rows["topk_ids"], rows["topk_logits"] = encode_topk(rows["topk_ids"], rows["topk_logits"])
    data = rows[name][-700:]  # a partial chunk: padded to 1024 rows
    padded = np.zeros((1024, *data.shape[1:]), data.dtype)
    padded[:700] = data
    codec = codec_for(name)
    cparams = _cparams(codec, data.dtype.itemsize, padded.nbytes)
    assert _frame_template(codec, data.dtype.itemsize, padded.nbytes) is not None
    frame = blosc2.SChunk(chunksize=padded.nbytes, data=padded.tobytes(), cparams=cparams)
    assert compress_chunk(data, 1024, codec)[:-4] == frame.to_cframe()


def test_fletcher32_is_hdf5s_own(tmp_path):
    # Chunks HDF5 wrote itself, of odd and even lengths, carry the checksum we compute.
    rng = np.random.default_rng(3)
    lengths = set()
    with h5py.File(tmp_path / "c.h5", "w") as f:
        for n, compression in enumerate(["default", "gzip", "lzf", "none"]):
            data = rng.integers(0, 1 + 10**n, (5000, 3)).astype(np.int32)
            data[:1000] = 0
            f.create_dataset(str(n), data=data, chunks=(700, 3), **compression_options(compression))
        for name in f:
            dataset = f[name]
            for i in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(i)
                _, stored = dataset.id.read_direct_chunk(info.chunk_offset)
                assert int.from_bytes(stored[-4:], "little") == fletcher32(stored[:-4])
                lengths.add(len(stored) % 2)
    assert lengths == {0, 1}


@pytest.mark.parametrize("where", ["frame header", "middle", "checksum"])
@pytest.mark.parametrize("dataset", ["topk_ids", "topk_logits", "entropy"])
def test_a_flipped_bit_in_a_direct_chunk_is_a_read_error(tmp_path, where, dataset):
    path = write(tmp_path / "s.h5", make_rows(3000, 16, BIG_VOCAB))
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(1)
    at = {"frame header": 20, "middle": info.size // 2, "checksum": info.size - 2}[where]
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + at)
        byte = handle.read(1)[0]
        handle.seek(info.byte_offset + at)
        handle.write(bytes([byte ^ 0x10]))
    with h5py.File(path, "r") as f:
        f[dataset][:1024]  # chunk 0 is untouched
        with pytest.raises(OSError):
            f[dataset][1024:2048]


FULL_DISK = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
from test_storage_scale import make_rows, write
from teacher_logits.errors import DiskFullError
resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))
try:
    write(sys.argv[2], make_rows(20000, 16, 128256))
except DiskFullError as exc:
    print(exc)
"""


def test_a_full_disk_during_direct_writes_is_one_clean_error(tmp_path):
    target = tmp_path / "shard.h5"
    # The writer runs in its own process, under a file-size limit (a full disk): the
    # refused write must surface as DiskFullError, never a libhdf5 crash.
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(REPO), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"disk full while writing {target}"), line
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # the partial file is gone
