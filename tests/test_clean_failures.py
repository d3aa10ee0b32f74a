"""Clean failures: a full disk in prepare and gather, resume parts counted at their true
size, a failed re-gather, shards of mixed runs, and status on damaged shards.

A full disk is simulated with a file-size limit (``ulimit -f``) set for the whole
Snakemake run; the real small filesystem (tmpfs) needs root and is skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

from teacher_logits.disk import free_bytes
from teacher_logits.errors import DiskFullError
from teacher_logits.layout import RunLayout
from teacher_logits.status import collect, render

from conftest import REPO, Workflow, demo_workflow
from test_shard_format import make_data, write_shard

OUT = "results/demo"
# Two shards of ~15k tokens each: about 1.6 MB per shard, 6 MB of resume parts.
RUN = {"num_shards": 2, "dataset": {"max_samples": 300}, "generation": {"threads": 1}}
NO_STORE = "no store is served until gather succeeds"


def file_size_limit(limit: int):
    """A ``preexec_fn``: no file of the run may grow past ``limit`` bytes (a full disk)."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def partials(root: Path) -> list[Path]:
    return sorted(root.rglob("*.partial"))


def assert_clean_failure(result, *needles):
    """Failed with one error line holding ``needles``; no traceback, no crash."""
    err = result.stderr
    assert result.returncode != 0
    assert "Traceback" not in err and "SIGSEGV" not in err and "Segmentation" not in err, err
    errors = [line for line in err.splitlines() if "] ERROR: " in line]
    assert len(errors) == 1, err[-4000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def job_counts(output: str) -> dict:
    table = output.split("Job stats:")[-1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def cli(wf: Workflow, module: str, *args: str, shell_tail: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"teacher_logits.{module}", OUT, *args]
    if shell_tail:
        command = ["bash", "-c", " ".join(command) + shell_tail]
    return subprocess.run(command, cwd=wf.root, capture_output=True, text=True, timeout=300)


def fingerprint_of(path: Path) -> tuple:
    return path.stat().st_mtime_ns, path.read_bytes()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_dir) -> Workflow:
    """One finished small run (prepare, 2 shards, gather); each test works on a copy."""
    wf = demo_workflow(tmp_path_factory.mktemp("clean_failures"), demo_dir)
    # The demo by its absolute path: a copy of the run then has the very same inputs.
    wf.config = {**RUN, "demo": {"dir": str(demo_dir)}}
    wf.run("--cores", "2", config=wf.config)
    return wf


def clone(wf: Workflow, root: Path) -> Workflow:
    shutil.copytree(wf.root, root, symlinks=True)
    copy = object.__new__(Workflow)
    copy.root, copy.lock_dir, copy.config = root, wf.lock_dir, wf.config
    return copy


# --- 1. a full disk in prepare and gather -------------------------------------------


@pytest.mark.slow
def test_prepare_on_a_full_disk_fails_in_one_line_and_leaves_nothing(workflow, demo_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join((demo_dir / "corpus.jsonl").read_text().splitlines(True)[:300]))
    config = {**RUN, "dataset": {"path": str(data)}}
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    args = ("--cores", "1", "--until", "prepare")

    # The datasets library converts the file to Arrow first (~100 KB): that fails here.
    full = workflow.run(
        *args, config=config, env=env, check=False, preexec_fn=file_size_limit(16000)
    )
    line = assert_clean_failure(full, "disk full while writing", "HF_DATASETS_CACHE")
    assert str(tmp_path / "hf_cache") in line and "ulimit -f" in line
    assert not partials(workflow.path(OUT))

    # The Arrow file fits, prepare's tokens.h5 (a 256 KB chunk at least) does not.
    full = workflow.run(
        *args, config=config, env=env, check=False, preexec_fn=file_size_limit(200000)
    )
    line = assert_clean_failure(full, f"disk full while writing {OUT}/prepared/tokens.h5", "needs")
    assert "rerun the same command" in line
    assert not partials(workflow.path(OUT)) and not partials(tmp_path / "hf_cache")
    assert not workflow.path(OUT, "prepared", "plan.json").exists()

    # With space again, the same command prepares the run.
    workflow.run(*args, config=config, env=env)
    plan = json.loads(workflow.path(OUT, "prepared", "plan.json").read_text())
    assert plan["num_samples"] == 300 and not partials(workflow.path(OUT))


@pytest.mark.slow
def test_gather_on_a_full_disk_fails_in_one_line_and_the_rerun_keeps_finished_work(
    finished, tmp_path
):
    wf = clone(finished, tmp_path / "wf")
    kept = [wf.path(OUT, "prepared", name) for name in ("tokens.h5", "plan.json")]
    kept += sorted(wf.path(OUT, "shards").glob("shard_*.h5"))
    before = {path: fingerprint_of(path) for path in kept}

    # index.h5 is ~17 KB here: a 10 KB limit stops gather, before it validates anything.
    full = wf.run(
        "--cores", "1", "--forcerun", "gather", config=wf.config, check=False,
        preexec_fn=file_size_limit(10000),
    )  # fmt: skip
    line = assert_clean_failure(full, f"disk full while writing {OUT}/index.h5", "needs about")
    assert "ulimit -f" in line and NO_STORE in line
    assert not partials(wf.path(OUT))
    assert not wf.path(OUT, "index.h5").exists() and not wf.path(OUT, "manifest.json").exists()

    # With space again: only gather (and what follows it) runs; nothing finished is redone.
    again = wf.run("--cores", "1", config=wf.config)
    assert set(job_counts(again.stdout + again.stderr)) <= {
        "gather",
        "report_figures",
        "all",
        "total",
    }
    assert {path: fingerprint_of(path) for path in kept} == before
    verify = cli(wf, "verify", "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr


PREPARED_WRITE = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import teacher_logits.store.prepared as prepared
from teacher_logits.errors import DiskFullError
if sys.argv[3] == "race":  # the check before writing misses (the disk fills meanwhile)
    prepared.ensure_room = lambda *args, **kwargs: None
resource.setrlimit(resource.RLIMIT_FSIZE, (300000, 300000))
writer = prepared.PreparedWriter(sys.argv[2], with_loss_mask=False)
try:
    for _ in range(10):
        writer.append(np.arange(50000, dtype=np.int32))
    writer.commit(np.arange(10), np.linspace(0, 500000, 11).astype(np.int64), np.array([0, 10]))
except DiskFullError as exc:
    writer.abort()
    print(exc)
"""


@pytest.mark.parametrize("when", ["checked", "race"])
def test_a_refused_hdf5_write_is_one_error_never_a_crash(tmp_path, when):
    # Without the guard, libhdf5 crashes the process at exit after a failed write (SIGSEGV).
    target = tmp_path / "prepared" / "tokens.h5"
    target.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", PREPARED_WRITE, str(REPO), str(target), when],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"disk full while writing {target}")
    assert "ulimit -f" in line and "rerun the same command" in line
    if when == "checked":
        assert "it needs about" in line  # found before writing: what it needs is known
    assert "Traceback" not in result.stderr
    assert list(target.parent.iterdir()) == []


# --- 2. resume parts at their true size ---------------------------------------------


def fake_plan(num_tokens: int) -> dict:
    return {
        "num_shards": 2,
        "num_samples": 20,
        "top_k": 64,
        "settings": {"storage": {"value_dtype": "float16"}, "generation": {"store_entropy": True}},
        "shards": [
            {"index": 0, "num_tokens": num_tokens, "num_samples": 10},
            {"index": 1, "num_tokens": 1000, "num_samples": 10},
        ],
    }


def test_check_shard_fits_counts_the_resume_parts_beside_the_shard(tmp_path):
    from teacher_logits.disk import bytes_per_token, check_shard_fits

    layout = RunLayout(tmp_path)
    layout.shards_dir.mkdir()
    layout.shard(1).write_bytes(b"\0" * 104_000)  # finished: 104 bytes/token, as measured
    free = free_bytes(tmp_path)
    # The shard alone takes 40% of the free space; with its parts (390 bytes/token) 190%.
    num_tokens = int(0.4 * free / 104)
    plan = fake_plan(num_tokens)
    assert bytes_per_token(plan, layout).shard_bytes(num_tokens, 10) < free  # the old check
    with pytest.raises(DiskFullError) as error:
        check_shard_fits(layout, plan, 0, "float16", True)
    message = str(error.value)
    assert message.startswith("disk full: shard 0 needs about")
    assert "for its resume parts, 390 bytes/token uncompressed" in message
    assert "measured on the finished shards" in message and "\n" not in message
    check_shard_fits(layout, fake_plan(1000), 0, "float16", True)  # a small one fits

    # Rows already committed in parts take no new space.
    layout.parts_dir(0).mkdir()
    layout.progress(0).write_text(json.dumps({"rows_done": num_tokens - 1000}))
    check_shard_fits(layout, plan, 0, "float16", True)


def test_status_counts_the_parts_and_warns_when_the_rest_does_not_fit(tmp_path):
    from teacher_logits.disk import part_bytes_per_token, parts_bytes, render_disk, run_needs

    layout = RunLayout(tmp_path)
    layout.shards_dir.mkdir()
    layout.shard(1).write_bytes(b"\0" * 104_000)
    plan = fake_plan(31_000)
    shards = [
        {**entry, "state": state, "rows_done": 0}
        for entry, state in zip(plan["shards"], ("pending", "done"))
    ]
    disk = run_needs(layout, plan, shards, done={1}, running=0)
    assert disk["bytes_per_token"] == 104 and disk["parts_bytes_per_token"] == 390
    assert disk["remaining_shard_bytes"] == 31_000 * 104 + 10 * 16
    assert disk["parts_bytes"] == parts_bytes(31_000, part_bytes_per_token(64, "float16", True))
    # 3.2 MB of shard would fit in 4.9 MB; with 12.5 MB of parts it does not.
    free = 4_900_000
    disk["fits"] = disk["remaining_bytes"] <= free
    text = "\n".join(render_disk(disk, free, "out"))
    assert not disk["fits"]
    assert "3.2 MB of shards + 12.5 MB of resume parts (390 bytes/token uncompressed" in text
    assert "WARNING: not enough disk: the rest of the run needs about 15.7 MB" in text
    assert "only 4.9 MB are free under out" in text


@pytest.mark.slow
def test_generate_refuses_a_shard_whose_resume_parts_do_not_fit(finished, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    wf = clone(finished, tmp_path / "wf")
    shards_dir = wf.path(OUT, "shards")
    shard0 = shards_dir / "shard_00000.h5"
    saved = tmp_path / "shard_00000.h5"
    shutil.copy2(shard0, saved)
    shutil.rmtree(shards_dir)
    shards_dir.mkdir()
    # Room for shard 0, shard 1 (~1.6 MB) and 2.4 MB more, not for shard 1's ~6 MB of parts.
    size = saved.stat().st_size + 4_000_000
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(shards_dir)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    try:
        shutil.copy2(saved, shard0)
        state = json.loads(cli(wf, "status", "--json").stdout)
        assert state["counts"]["done"] == 1 and not state["disk"]["fits"], state["disk"]
        assert state["disk"]["remaining_shard_bytes"] < state["free_bytes"]  # shards alone fit
        text = cli(wf, "status").stdout
        assert "of resume parts" in text and "WARNING: not enough disk" in text, text

        result = wf.run(
            "--cores", "1", f"{OUT}/shards/shard_00001.h5", config=wf.config, check=False
        )
        line = assert_clean_failure(result, "disk full: shard 1 needs about", "resume parts")
        assert "for the shard, measured on the finished shards" in line
        log = wf.path(OUT, "logs/generate/shard_00001.log").read_text()
        assert "teacher loaded" not in log  # refused before loading or computing anything
        assert not partials(shards_dir)
    finally:
        subprocess.run(["umount", str(shards_dir)], check=True)


# --- 3, 4 and 5c. a failed re-gather; shards of mixed runs --------------------------


def flip_a_data_byte(path: Path) -> None:
    """A bit flip inside topk_logits' first chunk; size and mtime stay as they were."""
    stat = path.stat()
    with h5py.File(path, "r") as f:
        info = f["topk_logits"].id.get_chunk_info(0)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_a_failed_regather_names_the_shard_says_the_store_is_gone_and_status_shows_it(
    finished, tmp_path
):
    wf = clone(finished, tmp_path / "wf")
    bad = wf.path(OUT, "shards", "shard_00001.h5")
    flip_a_data_byte(bad)

    result = wf.run("--cores", "1", "--forcerun", "gather", config=wf.config, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    first = next(line for line in result.stderr.splitlines() if "[gather] ERROR: " in line)
    assert "1 shard(s) failed validation (shard 1)" in first and NO_STORE in first
    assert f"shard 1 ({OUT}/shards/shard_00001.h5): corrupt or unreadable" in result.stderr
    assert not wf.path(OUT, "index.h5").exists() and not wf.path(OUT, "manifest.json").exists()

    text = cli(wf, "status").stdout
    assert "gather failed: 1 shard(s) failed validation (shard 1)" in text, text
    assert f"shard 1 ({OUT}/shards/shard_00001.h5): corrupt or unreadable" in text
    assert "Regenerate them with: " in text

    # The fix the error names: the shard is regenerated and gathered; nothing else runs.
    bad.unlink()
    again = wf.run("--cores", "1", config=wf.config)
    counts = job_counts(again.stdout + again.stderr)
    assert counts.get("generate") == 1 and counts.get("gather") == 1 and "prepare" not in counts
    assert cli(wf, "verify", "--deep").returncode == 0


def set_attr(path: Path, key: str, value: str) -> None:
    stat = path.stat()
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def swap_bytes_in_place(path: Path, old: str, new: str) -> None:
    """Another run's value for an attribute, as a copy from that run would carry: same size,
    same mtime, so nothing but a look inside tells (Snakemake does not rerun its job)."""
    assert len(old) == len(new)
    stat, data = path.stat(), path.read_bytes()
    assert data.count(old.encode()) == 1
    with open(path, "r+b") as handle:
        handle.seek(data.index(old.encode()))
        handle.write(new.encode())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_shards_of_another_teacher_are_refused_by_verify_deep_and_gather(finished, tmp_path):
    wf = clone(finished, tmp_path / "wf")
    plan = json.loads(wf.path(OUT, "prepared", "plan.json").read_text())
    odd = wf.path(OUT, "shards", "shard_00001.h5")
    theirs = "cd34" * (len(plan["teacher_fingerprint"]) // 4)
    swap_bytes_in_place(odd, plan["teacher_fingerprint"], theirs)

    # A store whose manifest vouches for the odd shard (as a gather without this check
    # wrote): the checksums pass, only --deep looks inside.
    manifest_path = wf.path(OUT, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["shards"][1]
    entry["sha256"] = hashlib.sha256(odd.read_bytes()).hexdigest()
    entry["bytes"] = odd.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    assert cli(wf, "verify").returncode == 0
    deep = cli(wf, "verify", "--deep")
    assert deep.returncode == 1 and "Traceback" not in deep.stderr
    ours = plan["teacher_fingerprint"][:12]
    assert (
        f"shard 0 and manifest.json have teacher_fingerprint {ours}..., shard 1 has "
        f"cd34cd34cd34...: they were made by different teachers" in deep.stdout
    ), deep.stdout
    assert "shards/shard_00001.h5: not the shard manifest.json lists" in deep.stdout

    result = wf.run("--cores", "1", "--forcerun", "gather", config=wf.config, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    first = next(line for line in result.stderr.splitlines() if "[gather] ERROR: " in line)
    assert (
        f"shard 0 and plan.json have teacher_fingerprint {ours}..., shard 1 has cd34cd34cd34...: "
        "they were made by different teachers" in first
    ), first
    assert "force_regenerate=true" in first and NO_STORE in first
    assert re.search(r"Regenerate them with: .*--forcerun \S*shard_00001.h5$", result.stderr, re.M)
    assert "teacher_fingerprint" in cli(wf, "status").stdout


def test_fingerprint_conflicts_name_the_shards_on_each_side():
    from teacher_logits.store.identity import fingerprint_conflicts, shard_list

    ours = {"teacher_fingerprint": "t" * 64, "config_fingerprint": "c" * 64}
    found = {i: dict(ours) for i in range(8)}
    found[5] = {"teacher_fingerprint": "u" * 64, "config_fingerprint": "d" * 64}
    found[6] = {**ours, "config_fingerprint": "e" * 64}
    found[7] = {**ours, "config_fingerprint": "e" * 64}
    assert fingerprint_conflicts(found, ours, "plan.json") == [
        "shards 0-4, 6-7 and plan.json have teacher_fingerprint tttttttttttt..., shard 5 has "
        "uuuuuuuuuuuu...: they were made by different teachers",
        "shards 0-4 and plan.json have config_fingerprint cccccccccccc..., shards 6-7 have "
        "eeeeeeeeeeee...: they were made with different settings that change the stored "
        "numbers (top_k, max_length, dtypes, temperatures, chat or overflow settings)",
    ]
    assert fingerprint_conflicts({0: ours}, ours, "plan.json") == []
    assert shard_list(range(0, 40, 2), limit=3) == "shards 0, 2, 4, ... (20 in all)"


# --- 5. status on damaged shards and a closed pipe -----------------------------------


def small_run(root: Path, num_shards: int = 7) -> tuple[RunLayout, Path]:
    """A plan whose shard 3 is finished: a real shard (top_k 8) with the plan's attributes."""
    data = make_data()
    layout = RunLayout(root)
    plan = {
        "num_shards": num_shards,
        "num_samples": num_shards * len(data.sample_ids),
        "top_k": 8,
        **{k: data.attrs[k] for k in ("teacher_fingerprint", "tokenizer_fingerprint")},
        "config_fingerprint": data.attrs["config_fingerprint"],
        "settings": {"storage": {"value_dtype": "float16"}, "generation": {"store_entropy": True}},
        "shards": [
            {"index": i, "num_tokens": int(data.offsets[-1]), "num_samples": len(data.sample_ids)}
            for i in range(num_shards)
        ],
    }
    layout.prepared_dir.mkdir(parents=True)
    layout.plan.write_text(json.dumps(plan))
    os.utime(layout.plan, ns=(1, 1))  # made before the shard
    data.attrs["num_shards"] = num_shards
    return layout, write_shard(layout.shard(3), data)


def shard3(layout: RunLayout) -> dict:
    return {s["index"]: s for s in collect(layout.output_dir)["shards"]}[3]


def test_status_reports_a_damaged_shard_as_failed_with_the_reason(tmp_path):
    layout, shard = small_run(tmp_path)
    assert shard3(layout)["state"] == "done"
    assert shard3(layout)["state"] == "done"  # the second look comes from status's cache

    # Truncated to half with its mtime put back: the size and ctime changed, so status
    # looks at the shard again instead of trusting its cache.
    stat = shard.stat()
    os.truncate(shard, stat.st_size // 2)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    state = shard3(layout)
    assert state["state"] == "failed", state
    assert "not a readable HDF5 file: truncated" in state["error"]
    assert "delete it and rerun the same command" in state["error"]

    shard.write_bytes(b"not hdf5 at all")
    assert "not a readable HDF5 file" in shard3(layout)["error"]

    layout, shard = small_run(tmp_path / "other")
    set_attr(shard, "config_fingerprint", "another-config")
    state = shard3(layout)
    assert state["state"] == "failed"
    assert (
        "is not this run's shard 3 (attribute config_fingerprint='another-config'"
        in (state["error"])
    )
    text = render(collect(layout.output_dir))
    assert "failed 1" in text and "another-config" in text

    layout, shard = small_run(tmp_path / "shape")
    with h5py.File(shard, "r+") as f:
        del f["logsumexp"]
    assert "dataset 'logsumexp' is missing" in shard3(layout)["error"]


def test_status_into_a_pipe_that_closes_early(tmp_path):
    # Thousands of pending shards: far more output than a pipe holds once `head` exits.
    layout, _ = small_run(tmp_path / "run", num_shards=3000)
    command = f"{sys.executable} -m teacher_logits.status {layout.output_dir} --all | head -1"
    result = subprocess.run(
        ["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0
    assert result.stdout == f"{layout.output_dir}: 3000 shards, 102,000 tokens planned\n"
    assert result.stderr == "", result.stderr


def test_status_names_a_damaged_store_still_on_disk(tmp_path):
    layout, shard = small_run(tmp_path)
    layout.manifest.write_text("{}")  # an earlier gather's store
    shard.write_bytes(b"damaged")
    text = render(collect(layout.output_dir))
    assert "WARNING: index.h5 and manifest.json are from an earlier gather, and shard 3" in text


def test_job_error_keeps_gathers_lines(tmp_path):
    from teacher_logits.layout import job_record_for
    from teacher_logits.status import job_error

    log = tmp_path / "gather.log"
    error = "1 shard(s) failed validation (shard 1); ...:\n  shard 1 (x): bad\nRegenerate them"
    job_record_for(log).write_text(json.dumps({"state": "failed", "error": error}))
    assert job_error(log) == "1 shard(s) failed validation (shard 1); ...:"
    assert job_error(log, whole=True) == error


def test_an_unwritable_place_for_text_leaves_no_partial(tmp_path):
    script = textwrap.dedent(
        """
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from teacher_logits.disk import write_text_guarded
        from teacher_logits.errors import DiskFullError
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            write_text_guarded(sys.argv[2], "x" * 5000)
        except DiskFullError as exc:
            print(exc)
        """
    )
    target = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPO), str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.startswith(f"disk full while writing {target}: it needs about 5.0 KB")
    assert list(tmp_path.iterdir()) == []
