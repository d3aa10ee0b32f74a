"""prepare streams big datasets: memory-mapped rows, several tokenizer processes, output
written as it goes; the result does not depend on the number of processes."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import teacher_logits.prepare as prepare_module
import teacher_logits.tokenization as tokenization
from teacher_logits.errors import UserError
from teacher_logits.layout import RunLayout
from teacher_logits.settings import PrepareSettings

from conftest import REPO


def base_config(dataset: Path, **dataset_keys) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["dataset"].update(path=str(dataset), **dataset_keys)
    config["num_shards"] = 3
    config["gpu_assignment"] = "local"  # as the Snakefile resolves it for a local run
    return config


def run_prepare(config, demo_dir, out: Path, threads: int) -> dict:
    config = {**config, "teacher": {**config["teacher"], "path": str(demo_dir / "teacher")}}
    layout = RunLayout(out)
    layout.prepared_dir.mkdir(parents=True)
    prepare_module.prepare(PrepareSettings.from_config(config, threads), layout)
    with h5py.File(layout.tokens) as f:
        arrays = {name: f[name][:] for name in f}
    return {"arrays": arrays, "plan": json.loads(layout.plan.read_text())}


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_several_processes_give_the_same_result_as_one(demo_dir, tmp_path, monkeypatch, kind):
    texts = [json.loads(line)["text"] for line in (demo_dir / "corpus.jsonl").open()][:300]
    texts[17] = "   "
    path = tmp_path / "data.jsonl"
    if kind == "text":
        rows = [{"text": t} for t in texts]
        config = base_config(path, max_samples=290)
    else:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": t[:50]},
                    {"role": "assistant", "content": t[50:200]},
                ]
                if i != 17
                else []
            }
            for i, t in enumerate(texts)
        ]
        template = tmp_path / "t.jinja"
        template.write_text(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        )
        config = base_config(path, messages_field="messages", chat_template=str(template))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config["tokenize"]["max_length"] = 40
    one = run_prepare(config, demo_dir, tmp_path / "one", threads=1)
    # Tiny batches and a low per-process floor, so two processes share the work.
    monkeypatch.setattr(tokenization, "READ_BATCH_ROWS", 16)
    monkeypatch.setattr(prepare_module, "ROWS_PER_PROCESS", 50)
    two = run_prepare(config, demo_dir, tmp_path / "two", threads=2)
    assert one["arrays"].keys() == two["arrays"].keys()
    assert ("loss_mask" in one["arrays"]) is (kind == "chat")
    for name in one["arrays"]:
        np.testing.assert_array_equal(one["arrays"][name], two["arrays"][name], err_msg=name)
    assert one["plan"] == two["plan"]
    assert one["plan"]["dropped"][0]["sample_id"] == 17
    assert one["plan"]["truncated_samples"] > 0


def test_a_bad_row_in_a_tokenizer_process_is_one_clear_error(demo_dir, tmp_path, monkeypatch):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "hello"},
            ]
        }
        for i in range(200)
    ]
    rows[150]["messages"][1]["role"] = "bot"
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    config = base_config(path, messages_field="messages", chat_template=str(template))
    monkeypatch.setattr(tokenization, "READ_BATCH_ROWS", 16)
    monkeypatch.setattr(prepare_module, "ROWS_PER_PROCESS", 50)
    with pytest.raises(UserError, match="dataset row 150, message 1: unknown role 'bot'"):
        run_prepare(config, demo_dir, tmp_path / "out", threads=2)
    assert list((tmp_path / "out" / "prepared").iterdir()) == []  # no half-written tokens file


def private_memory_of_tree(pid: int) -> int:
    """Bytes of private memory of a process and its children: anonymous pages (not the
    memory-mapped dataset, which the kernel may drop), pages shared after fork counted once."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss_Anon:"):
                total += int(line.split()[1]) * 1024
        stack += [int(c) for c in children]
    return total


def peak_memory_of_prepare(tmp_path, demo_dir, dataset: Path, max_samples: int, name: str) -> int:
    """Run prepare in a child process (2 tokenizer processes); its peak private memory."""
    out = tmp_path / name
    out.mkdir()
    script = textwrap.dedent(f"""
        import sys, yaml
        sys.path.insert(0, {str(REPO)!r})
        from teacher_logits.layout import RunLayout
        from teacher_logits.prepare import prepare
        from teacher_logits.settings import PrepareSettings
        config = yaml.safe_load(open({str(REPO / "config" / "config.yaml")!r}))
        config["dataset"].update(path={str(dataset)!r}, max_samples={max_samples})
        config["teacher"]["path"] = {str(demo_dir / "teacher")!r}
        config["tokenize"]["max_length"] = 128
        config["num_shards"] = 4
        config["gpu_assignment"] = "local"
        prepare(PrepareSettings.from_config(config, threads=2), RunLayout({str(out)!r}))
    """)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    peak = 0

    def watch():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, private_memory_of_tree(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert proc.wait(timeout=3600) == 0
    watcher.join()
    plan = json.loads((out / "prepared" / "plan.json").read_text())
    assert plan["num_samples"] == max_samples
    with h5py.File(out / "prepared" / "tokens.h5") as f:
        assert f["offsets"][-1] == plan["num_tokens"] == f["input_ids"].shape[0]
    return peak, plan["num_tokens"]


@pytest.mark.slow
def test_a_million_samples_prepare_in_bounded_memory(demo_dir, tmp_path):
    """1M rows take no more memory than 50k: nothing in prepare grows with the data but
    two int64 numbers per sample (16 MB here), while the texts alone would take ~0.3 GB as
    Python strings, and their token ids ~0.2 GB even as int32 (several GB as lists)."""
    rng = np.random.default_rng(0)
    words = np.array(
        " ".join(json.loads(line)["text"] for line in (demo_dir / "corpus.jsonl").open()).split()
    )
    path = tmp_path / "million.jsonl"
    text_bytes = 0
    with path.open("w") as handle:
        for _ in range(100):  # in blocks: the test process stays small too
            lengths = rng.integers(10, 50, 10_000)
            picks = words[rng.integers(0, len(words), int(lengths.sum()))]
            for chunk in np.split(picks, np.cumsum(lengths)[:-1]):
                text = " ".join(chunk)
                text_bytes += len(text)
                handle.write(json.dumps({"text": text}) + "\n")
    in_memory = text_bytes + 1_000_000 * sys.getsizeof("")

    small, _ = peak_memory_of_prepare(tmp_path, demo_dir, path, 50_000, "small")
    large, tokens = peak_memory_of_prepare(tmp_path, demo_dir, path, 1_000_000, "large")
    growth = large - small
    print(
        f"\npeak private memory of prepare and its tokenizer processes: {small / 2**20:.0f} MiB "
        f"at 50k rows, {large / 2**20:.0f} MiB at 1M rows ({tokens:,} tokens); the texts as "
        f"Python strings: {in_memory / 2**20:.0f} MiB"
    )
    assert growth < 64 * 2**20
    assert growth < in_memory / 5
