"""Corrupt, swapped or duplicated shards in a finished store: gather names each one.

One small store is built per module (plus single shards made with another top_k,
max_length and teacher); every case runs on its own copy, damages one shard the
way a disk, a copy or a person would, and reruns the user's command.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys

import h5py
import pytest

from conftest import Workflow, demo_workflow

BASE = {
    "num_shards": 3,
    "dataset": {"max_samples": 48},
    "tokenize": {"max_length": 64},
    "generation": {"threads": 1, "batch_tokens": 1024},
}
BAD = 1  # the shard every case damages
BAD_PATH = f"results/demo/shards/shard_{BAD:05d}.h5"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_counts(output: str) -> dict:
    table = output.split("Job stats:")[-1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def _random_teacher(demo_dir, out):
    """The demo architecture and tokenizer with other (random) weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(demo_dir / "teacher")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_dir / "teacher").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_dir):
    """A finished store, plus shard 1 made under another top_k, max_length and teacher."""
    root = tmp_path_factory.mktemp("corruption")
    wf = demo_workflow(root, demo_dir)
    wf.run("--cores", "2", config=BASE)
    others = {}
    variants = {
        "top_k": {"generation": {**BASE["generation"], "top_k": 8}},
        "max_length": {"tokenize": {"max_length": 32}},
        "teacher": {"teacher": {"path": str(_random_teacher(demo_dir, root / "teacher"))}},
    }
    for name, change in variants.items():
        out = f"results/other_{name}"
        target = f"{out}/shards/shard_{BAD:05d}.h5"
        wf.run("--cores", "2", target, config={**BASE, **change, "output_dir": out})
        others[name] = wf.path(target)
    return wf, others


def clone(wf: Workflow, root) -> Workflow:
    shutil.copytree(wf.root, root, symlinks=True)
    copy = object.__new__(Workflow)
    copy.root, copy.lock_dir = root, wf.lock_dir
    return copy


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def object_header_message(path, dataset: str, message_type: int) -> int:
    """File offset of a message's type field in a dataset's (version 1) object header."""
    with h5py.File(path, "r") as f:
        address = h5py.h5o.get_info(f[dataset].id).addr
    raw = path.read_bytes()
    assert raw[address] == 1, "object header is not version 1: the shard layout changed"
    (count,) = struct.unpack_from("<H", raw, address + 2)
    position = address + 16  # the version 1 prefix, padded to 8 bytes
    for _ in range(count):
        kind, size = struct.unpack_from("<HH", raw, position)
        if kind == message_type:
            return position
        position += 8 + size
    raise AssertionError(f"no message {message_type:#x} in {dataset}'s object header")


# Each case damages shard BAD in place and says what gather's message must contain.


def truncate(path, others):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_data(path, others):
    with h5py.File(path, "r") as f:
        info = f["topk_logits"].id.get_chunk_info(0)
    flip(path, info.byte_offset + info.size // 2)


def flip_superblock(path, others):
    flip(path, 1)  # inside the HDF5 signature


CRASH_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from teacher_logits.errors import ShardError
from teacher_logits.store.prepared import read_prepared
from teacher_logits.store.validate import ShardExpectation, validate_shard
shard, offset, index = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = shard.parents[1]
plan = json.loads((store / "prepared" / "plan.json").read_text())
ids, offsets, input_ids = read_prepared(store / "prepared" / "tokens.h5").shard_slice(index)
data = bytearray(shard.read_bytes())
data[offset] ^= 0xFF
trial = Path(sys.argv[5])
trial.write_bytes(bytes(data))
try:
    validate_shard(trial, ShardExpectation(sample_ids=ids, offsets=offsets, input_ids=input_ids, attrs={}, vocab_size=plan["vocab_size"]))
except ShardError:
    pass
"""


def crashing_offset(path) -> int:
    """A byte whose flip makes libhdf5 segfault when a plain process validates this shard.

    Tries the type field of every chunked dataset's filter-pipeline message (a full
    scan of a shard's metadata found crashes there; which one crashes depends on
    the data and the process's memory layout), each in a fresh interpreter.
    """
    from conftest import REPO

    candidates = [
        object_header_message(path, name, 0x000B) + byte
        for name in ("topk_ids", "topk_logits", "input_ids", "logsumexp", "entropy")
        for byte in (0, 1)
    ]
    trial = path.with_name("probe.h5")
    try:
        for offset in candidates:
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CRASH_PROBE,
                    str(REPO),
                    str(path),
                    str(offset),
                    str(BAD),
                    str(trial),
                ],
                capture_output=True,
                timeout=300,
            )
            if probe.returncode == -signal.SIGSEGV:
                return offset
    finally:
        trial.unlink(missing_ok=True)
    pytest.skip("no candidate byte flip crashes this libhdf5: nothing to isolate")


def flip_crashing_metadata(path, others):
    flip(path, crashing_offset(path))


def flip_dataspace(path, others):
    # The first byte of the dataset's dimension size.
    flip(path, object_header_message(path, "logsumexp", 0x0001) + 8 + 8)


def delete_dataset(path, others):
    with h5py.File(path, "r+") as f:
        del f["logsumexp"]


def swap(name):
    def apply(path, others):
        shutil.copyfile(others[name], path)  # a new mtime, as any copy by hand gives

    apply.__name__ = f"swap_{name}"
    return apply


def repeat_samples(path, others):
    with h5py.File(path, "r+") as f:
        ids = f["sample_ids"][:]
        ids[1] = ids[0]
        f["sample_ids"][:] = ids


def overlap_samples(path, others):
    neighbour = path.with_name(f"shard_{BAD - 1:05d}.h5")
    with h5py.File(neighbour, "r") as f:
        last_of_neighbour = f["sample_ids"][-1]
    with h5py.File(path, "r+") as f:
        ids = f["sample_ids"][:]
        ids[0] = last_of_neighbour
        f["sample_ids"][:] = ids


CASES = [
    (truncate, "not a readable HDF5 file"),
    (flip_data, "corrupt or unreadable"),
    (flip_superblock, "not a readable HDF5 file"),
    # Whether libhdf5 crashes inside gather's worker or reads garbage instead depends
    # on the process's memory layout: either way gather reports the shard (the crash
    # path itself is tested deterministically in test_shard_check.py).
    (flip_crashing_metadata, r"HDF5 library crashed|outside the vocabulary|non-finite|corrupt"),
    (flip_dataspace, "dataset .logsumexp. is unreadable"),
    (delete_dataset, "dataset 'logsumexp' is missing"),
    (swap("top_k"), "attribute top_k=8, expected 64"),
    (swap("max_length"), "attribute config_fingerprint="),
    (swap("teacher"), "attribute teacher_fingerprint="),
    (repeat_samples, "appear more than once"),
    (overlap_samples, "belong to another shard"),
]


@pytest.mark.parametrize("damage,message", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.slow
def test_gather_names_the_bad_shard_and_the_command(store, tmp_path, damage, message):
    base, others = store
    wf = clone(base, tmp_path / "wf")
    shards = sorted(wf.path("results/demo/shards").glob("shard_*.h5"))
    bad = wf.path(BAD_PATH)
    damage(bad, others)
    before = {p: _sha(p) for p in [*shards, wf.path("results/demo/prepared/tokens.h5")]}

    result = wf.run("--cores", "2", config=BASE, check=False)
    err = result.stderr
    assert result.returncode != 0, "gather accepted a damaged shard"
    assert "Traceback" not in err, err[-3000:]
    line = re.search(rf"^\s*shard {BAD} \({re.escape(BAD_PATH)}\): (.*)$", err, re.M)
    assert line, err[-3000:]
    assert re.search(message, line.group(1)), line.group(0)
    command = re.search(r"Regenerate them with: (.*)$", err, re.M).group(1)
    assert command.endswith(f"--forcerun {BAD_PATH}")
    # Only gather ran, and it touched nothing: the damaged shard stays for inspection.
    assert set(job_counts(result.stdout + err)) <= {"gather", "report_figures", "all", "total"}
    assert {p: _sha(p) for p in before} == before

    if damage is flip_crashing_metadata:
        # The printed command is the user's own one, and it repairs the store.
        repair = subprocess.run(
            shlex.split(command), cwd=wf.root, capture_output=True, text=True, timeout=900
        )
        assert repair.returncode == 0, repair.stderr[-3000:]
        counts = job_counts(repair.stdout + repair.stderr)
        assert counts.get("generate") == 1 and counts.get("gather") == 1
        assert _sha(bad) != before[bad]
        assert all(_sha(p) == h for p, h in before.items() if p != bad)
        manifest = wf.manifest()
        assert [s["index"] for s in manifest["shards"]] == list(range(BASE["num_shards"]))


@pytest.mark.slow
def test_two_bad_shards_are_reported_together(store, tmp_path):
    base, others = store
    wf = clone(base, tmp_path / "wf")
    truncate(wf.path("results/demo/shards/shard_00000.h5"), others)
    delete_dataset(wf.path("results/demo/shards/shard_00002.h5"), others)
    result = wf.run("--cores", "2", config=BASE, check=False)
    assert result.returncode != 0
    assert "2 shard(s) failed validation" in result.stderr
    assert re.search(
        r"--forcerun results/demo/shards/shard_00000.h5 results/demo/shards/shard_00002.h5$",
        result.stderr,
        re.M,
    )
    assert all(f"shard {i} (" in result.stderr for i in (0, 2))


# --- python -m teacher_logits.verify on a copied store -------------------------------


def copy_store(wf: Workflow, target):
    """What a user copies: the shards, index.h5 and manifest.json (not prepared/ or logs/)."""
    source = wf.path("results/demo")
    target.mkdir(parents=True)
    shutil.copytree(source / "shards", target / "shards")
    for name in ("index.h5", "manifest.json"):
        shutil.copy2(source / name, target / name)
    return target


def run_verify(store, *args, tmp_path):
    """The CLI from another folder, with torch and snakemake made unimportable."""
    from conftest import REPO

    poison = tmp_path / "poison"
    for name in ("torch", "snakemake"):
        (poison / name).mkdir(parents=True, exist_ok=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('verify imported {name}')\n")
    env = {**os.environ, "PYTHONPATH": f"{poison}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, "-m", "teacher_logits.verify", str(store), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def unused_btree_byte(path) -> int:
    """A byte in the unused tail of a chunk B-tree node: no reader ever looks at it."""
    raw = path.read_bytes()
    position = raw.find(b"TREE")
    while position >= 0 and raw[position + 4] != 1:  # node type 1: raw-data chunks
        position = raw.find(b"TREE", position + 4)
    assert position >= 0, "no chunk B-tree node: the shard layout changed"
    (used,) = struct.unpack_from("<H", raw, position + 6)
    # Header 24 bytes, then keys (at most 32 bytes here) and 8-byte child addresses.
    offset = position + 24 + (used + 1) * 32 + used * 8 + 64
    assert raw[offset] == 0
    return offset


@pytest.mark.slow
def test_a_copied_store_verifies(store, tmp_path):
    base, _ = store
    copy = copy_store(base, tmp_path / "elsewhere" / "store")
    for args in ((), ("--deep",)):
        result = run_verify(copy, *args, tmp_path=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        (line,) = result.stdout.splitlines()
        assert line.startswith(f"OK: {copy}: 3 shards and index.h5 match manifest.json")
        assert "Traceback" not in result.stderr


def _flip_unused(root):
    path = root / "shards" / "shard_00001.h5"
    flip(path, unused_btree_byte(path))
    return "shards/shard_00001.h5: sha256 differs"


def _flip_attribute_bit(root):
    path = root / "shards" / "shard_00001.h5"
    raw = bytearray(path.read_bytes())
    position = bytes(raw).find(b'"numpy": "') + len(b'"numpy": "')
    raw[position] ^= 0x01  # one digit of a version string: still valid text
    path.write_bytes(bytes(raw))
    return "shards/shard_00001.h5: sha256 differs"


def _flip_data(root):
    flip_data(root / "shards" / "shard_00001.h5", None)
    return "shards/shard_00001.h5: sha256 differs"


def _flip_index(root):
    path = root / "index.h5"
    flip(path, path.stat().st_size // 2)
    return "index.h5: sha256 differs"


def _truncate(root):
    truncate(root / "shards" / "shard_00002.h5", None)
    return "shards/shard_00002.h5: "


def _delete(root):
    (root / "shards" / "shard_00000.h5").unlink()
    return "shards/shard_00000.h5: missing"


def _damage_manifest(root):
    path = root / "manifest.json"
    path.write_text(path.read_text()[:-40])
    return "manifest.json: unreadable"


@pytest.mark.parametrize(
    "damage",
    [
        _flip_unused,
        _flip_attribute_bit,
        _flip_data,
        _flip_index,
        _truncate,
        _delete,
        _damage_manifest,
    ],
)
@pytest.mark.slow
def test_verify_catches_any_changed_byte(store, tmp_path, damage):
    base, _ = store
    copy = copy_store(base, tmp_path / "store")
    expected = damage(copy)
    result = run_verify(copy, tmp_path=tmp_path)
    assert result.returncode == 1, result.stdout
    assert expected in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == (1 if damage is _damage_manifest else 2)  # the problem (+ a count)


@pytest.mark.slow
def test_unused_space_flip_is_invisible_to_validation_but_not_to_verify(store, tmp_path):
    base, _ = store
    copy = copy_store(base, tmp_path / "store")
    _flip_unused(copy)
    deep = run_verify(copy, "--deep", tmp_path=tmp_path)
    # Only the checksum sees it: the deep check adds no second line for this shard.
    assert deep.returncode == 1
    assert [line.split(":")[0] for line in deep.stdout.splitlines()[:-1]] == [
        "shards/shard_00001.h5"
    ]


@pytest.mark.slow
def test_deep_verify_says_what_is_wrong_inside(store, tmp_path):
    base, _ = store
    copy = copy_store(base, tmp_path / "store")
    _flip_data(copy)
    result = run_verify(copy, "--deep", tmp_path=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any("sha256 differs" in line for line in lines)
    assert any(line.startswith("shards/shard_00001.h5: corrupt or unreadable") for line in lines)
    assert "--forcerun <output_dir>/shards/shard_00001.h5" in lines[0]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["snakemake", "--cores", "8", "--configfile", "my.yaml"],
            "snakemake --cores 8 --configfile my.yaml --forcerun S",
        ),
        (
            [
                "snakemake",
                "--cores",
                "8",
                "--forcerun",
                "gather",
                "prepare",
                "--config",
                "gpus=0,1",
            ],
            "snakemake --cores 8 --config gpus=0,1 --forcerun S",
        ),
        (
            ["snakemake", "-n", "--config", "force_regenerate=true", "--cores", "2"],
            "snakemake --cores 2 --forcerun S",
        ),
        (None, "snakemake --cores N <your usual --config/--configfile> --forcerun S"),
    ],
)
def test_regenerate_hint_is_the_users_command_with_forcerun(monkeypatch, argv, expected):
    import teacher_logits.gather as gather

    monkeypatch.setattr(gather, "_snakemake_argv", lambda: argv)
    assert gather.regenerate_hint(["S"]) == expected
