"""Rule ``generate``: one shard of prepared tokens -> the teacher's top-k -> shard file.

Claims a GPU group first (inside the running job, never at plan time), sets
``CUDA_VISIBLE_DEVICES`` to it, and only then imports torch.
"""


import errno
import hashlib
import json
import logging
import os
import platform
import queue
import resource
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

if __name__ == "__main__":  # Snakemake runs a copy of this file: import from the repository
    sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821

from workflow_scripts.batching import long_document_windows, plan_batches, windows  # noqa: E402
from workflow_scripts.disk_estimate import check_shard_fits  # noqa: E402
from workflow_scripts.gpu_groups import gpu_claim, groups_from_config  # noqa: E402
from workflow_scripts.job import UserError  # noqa: E402
from workflow_scripts.resume import (  # noqa: E402
    CommittedParts,
    claims_from_parts,
    parts_dir_for,
    job_lock,
)
from workflow_scripts.shard_format import (  # noqa: E402
    FORMAT_VERSION,
    VALUE_DTYPES,
    PartWriter,
    ShardError,
    ShardWriter,
    iter_part_rows,
    needed_rows,
    read_attrs,
    read_part_attrs,
    read_prepared_shard,
    validate_shard,
)

log = logging.getLogger("generate")

# A window of consecutive samples is computed, then written in order. Its size
# trades memory (results are held until written) against how well length sorting
# packs batches.
WINDOW_BATCHES = 32
# A part is built in memory before it is written: cap it (~100 MB at k=64) whatever
# commit_every_s says.
PART_MAX_ROWS = 1 << 18


def library_versions() -> dict:
    import h5py
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


class _LogStream:
    """A file-like object that turns tqdm's refreshes into log lines."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            log.info("%s", text)

    def flush(self) -> None:
        pass


def progress_bar(total_tokens: int, shard: int, initial: int = 0, every_s: float = 30.0):
    """A tqdm bar over tokens with tokens/s and ETA, as one log line every ``every_s``."""
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc=f"shard {shard}",
        file=_LogStream(),
        mininterval=every_s,
        ascii=True,
        ncols=100,
    )


class _SimulatedOutOfMemory:
    """Test hook: ``TEACHER_LOGITS_SIMULATE_OOM_TOKENS=N`` makes any padded batch of more
    than N positions fail as CUDA would, so the batch-split path runs on CPU."""

    limit = int(os.environ.get("TEACHER_LOGITS_SIMULATE_OOM_TOKENS", "0") or 0)

    @classmethod
    def check(cls, positions: int) -> None:
        if cls.limit and positions > cls.limit:
            import torch

            raise torch.OutOfMemoryError(f"simulated: {positions} positions > {cls.limit}")


def forward_batch(head, batch: np.ndarray, input_ids: np.ndarray, offsets: np.ndarray, pad_id: int):
    """Top-k of one padded batch; on out-of-memory, retry it as two halves (logged)."""
    import torch

    lengths = offsets[batch + 1] - offsets[batch]
    width = int(lengths.max())
    try:
        _SimulatedOutOfMemory.check(len(batch) * width)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sample in enumerate(batch):
            start, stop = offsets[sample], offsets[sample + 1]
            ids[row, : stop - start] = torch.from_numpy(input_ids[start:stop].astype(np.int64))
            mask[row, : stop - start] = 1
        result = head(ids, mask)
        return [result]
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            raise UserError(
                f"out of memory on a single sample of {width} tokens ({exc}); lower "
                "tokenize.max_length or give each model more GPUs (gpus_per_model)"
            ) from None
        half = len(batch) // 2
        log.warning(
            "out of memory on a batch of %d samples x %d tokens; retrying it as two halves "
            "(consider a smaller generation.batch_tokens)", len(batch), width,
        )
        return (forward_batch(head, batch[:half], input_ids, offsets, pad_id)
                + forward_batch(head, batch[half:], input_ids, offsets, pad_id))


def compute_window(head, input_ids: np.ndarray, offsets: np.ndarray, batch_tokens: int, pad_id: int):
    """Top-k rows of the samples in one window, concatenated in sample order."""
    lengths = np.diff(offsets)
    num_rows = int(offsets[-1])
    out = {
        "topk_ids": np.empty((num_rows, head.top_k), dtype=np.int32),
        "topk_logits": np.empty((num_rows, head.top_k), dtype=np.float32),
        "logsumexp": np.empty(num_rows, dtype=np.float32),
        "entropy": np.empty(num_rows, dtype=np.float32),
    }
    for batch in plan_batches(lengths, batch_tokens):
        results = forward_batch(head, batch, input_ids, offsets, pad_id)
        samples = iter(batch)
        for result in results:
            # Valid positions come back row-major: sample by sample in batch order.
            cursor = 0
            while cursor < len(result.logsumexp):
                sample = next(samples)
                start, stop = int(offsets[sample]), int(offsets[sample + 1])
                n = stop - start
                out["topk_ids"][start:stop] = result.ids[cursor : cursor + n].numpy()
                out["topk_logits"][start:stop] = result.logits[cursor : cursor + n].numpy()
                out["logsumexp"][start:stop] = result.logsumexp[cursor : cursor + n].numpy()
                out["entropy"][start:stop] = result.entropy[cursor : cursor + n].numpy()
                cursor += n
    return out


def compute_window_split(head, input_ids: np.ndarray, offsets: np.ndarray, batch_tokens: int,
                         pad_id: int, max_length: int, stride: int):
    """``compute_window`` where documents may be longer than ``max_length`` (overflow: split).

    Each long document is read in overlapping windows of at most ``max_length`` tokens
    (``long_document_windows``); the windows are batched like short samples, and each
    row is taken from the one window that keeps it. Windows that fit change nothing.
    """
    lengths = np.diff(offsets)
    if not len(lengths) or int(lengths.max()) <= max_length:
        return compute_window(head, input_ids, offsets, batch_tokens, pad_id)
    cut = long_document_windows(lengths, max_length, stride)
    starts = offsets[cut["sample"]] + cut["start"]
    stops = offsets[cut["sample"]] + cut["stop"]
    window_ids = np.concatenate([input_ids[a:b] for a, b in zip(starts, stops)])
    window_offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
    rows = compute_window(head, window_ids, window_offsets, batch_tokens, pad_id)
    # Kept rows tile each document in order, and windows come in document order, so
    # the kept rows, concatenated, are the window's rows in token order.
    first = window_offsets[:-1] + (cut["keep_start"] - cut["start"])
    keep = np.concatenate([np.arange(a, b) for a, b in zip(first, window_offsets[1:])])
    return {name: values[keep] for name, values in rows.items()}


def scheduler_job_id() -> str | None:
    """The cluster's id for this job (SLURM's, or another scheduler's), for provenance."""
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def load_head(config: dict, claim, wants_gpu: bool):
    """Load the teacher on the claimed GPUs (or CPU) and wrap it in the top-k head."""
    import torch

    from workflow_scripts.teacher import TopKHead, load_teacher
    from workflow_scripts.workflow_config import teacher_path

    scheduler = config["gpu_assignment"] == "scheduler"
    # A scheduler that sets no mask (whole-node allocations) leaves every GPU visible.
    on_gpu = torch.cuda.is_available() and (claim.cuda_visible_devices != "" or scheduler)
    if wants_gpu and not on_gpu and not config["allow_cpu"] and scheduler:
        raise UserError(
            f"the scheduler gave this job CUDA_VISIBLE_DEVICES={claim.cuda_visible_devices!r} "
            "but CUDA sees no GPU; run generate on a GPU partition (it asks for "
            "gpus_per_model GPUs), or set allow_cpu=true to run on CPU"
        )
    if wants_gpu and not on_gpu and not config["allow_cpu"]:
        raise UserError(
            f"CUDA_VISIBLE_DEVICES={claim.cuda_visible_devices!r} but CUDA sees no GPU; "
            "check the driver, or set allow_cpu=true to run on CPU"
        )
    teacher = config["teacher"]
    model = load_teacher(
        str(teacher_path(config)),
        dtype=teacher["dtype"],
        attn_implementation=teacher["attn_implementation"],
        trust_remote_code=teacher["trust_remote_code"],
        max_memory=teacher["max_memory"],
        allow_offload=teacher["allow_offload"],
        on_gpu=on_gpu,
    )
    generation = config["generation"]
    return TopKHead(model, int(generation["top_k"]), with_entropy=bool(generation["store_entropy"]))


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# libhdf5 reports a failed write through h5py with the OS error only in its message.
DISK_FULL_WORDS = ("No space left", "Disk quota", "File too large", "errno = 28", "errno = 27")


def disk_full(path: Path, needed: int | None = None) -> UserError:
    free = room_under(path.parent) / 2**20
    need = f"it needs up to {needed / 2**20:.0f} MiB, " if needed else ""
    return UserError(
        f"disk full while writing {path}: {need}{free:.0f} MiB free there; free space or move "
        "output_dir, then rerun the same command (committed parts and finished shards are kept)"
    )


def room_under(directory: Path, growing: Path | None = None) -> int:
    """Bytes a file may still take there: free disk, or what a file-size limit
    (ulimit -f) leaves to ``growing``, a file being written."""
    free = shutil.disk_usage(directory).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return free
    return min(free, soft - (growing.stat().st_size if growing is not None else 0))


@contextmanager
def disk_full_is_a_user_error(path: Path):
    """Turn a full disk (or a file-size limit) into one line that says what to do."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS) or any(
            word in str(exc) for word in DISK_FULL_WORDS
        )
        if not full:
            raise
        raise disk_full(path) from None


class PartCommitter:
    """Writes rows into the current part file and commits it every ``commit_every_s``."""

    def __init__(self, parts: CommittedParts, claim, top_k: int, value_dtype: str,
                 with_entropy: bool, commit_every_s: float):
        self.parts, self.claim = parts, claim
        self.top_k, self.value_dtype, self.with_entropy = top_k, value_dtype, with_entropy
        self.commit_every_s = commit_every_s
        self.writer = None
        self.opened_at = 0.0
        self.compute_seconds = 0.0
        self.rows_computed = 0

    def add(self, first_sample: int, first_row: int, num_samples: int, rows: dict, seconds: float):
        if self.writer is None:
            self.writer = PartWriter(
                self.parts.part_path(first_sample), first_sample, first_row, self.top_k,
                self.value_dtype, self.with_entropy,
            )
            self.opened_at = time.time()
        with disk_full_is_a_user_error(self.writer.path):
            self.writer.append(num_samples, rows)
        self.compute_seconds += seconds
        self.rows_computed += len(rows["logsumexp"])
        if (time.time() - self.opened_at >= self.commit_every_s
                or self.writer.num_rows >= PART_MAX_ROWS):
            self.commit()

    def commit(self) -> None:
        if self.writer is None:
            return
        attrs = {
            "claim_cuda_visible_devices": self.claim.cuda_visible_devices,
            "claim_hostname": self.claim.hostname,
            "claim_started_at": self.claim.started_at,
            "claim_scheduler_job_id": scheduler_job_id() or "",
            "committed_at": time.time(),
            "compute_seconds": self.compute_seconds,
        }
        with disk_full_is_a_user_error(self.writer.path):
            path = self.writer.commit(attrs)
        self.parts.add(path, read_part_attrs(path))
        self.writer, self.compute_seconds = None, 0.0

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class WriterThread:
    """Runs the writing side of a shard in its own thread, so compute never waits on it.

    Jobs run in submission order: committing part files and encoding + compressing
    rows into the shard. A bounded queue makes compute wait only when writing falls
    more than ``depth`` windows behind; an error in a job is raised in the caller
    at its next ``submit`` or at ``close``.
    """

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the main thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job) -> None:
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for every submitted job; raise the first error one of them hit."""
        self._jobs.put(None)
        self._thread.join()
        self._raise()


def rows_in_stored_dtypes(rows: dict, value_dtype: str) -> dict:
    """Cast once, so the part files and the shard hold the very same bits."""
    out = dict(rows)
    out["topk_logits"] = rows["topk_logits"].astype(VALUE_DTYPES[value_dtype], copy=False)
    out["entropy"] = rows["entropy"].astype(np.float16, copy=False)
    return out


class ShardSink:
    """Rows to the shard file as they are computed (the live assembly).

    The rows of parts committed by an earlier claim go in first, then each new
    window's; at the end the shard is committed with no copying pass left to do.
    """

    def __init__(self, writer: ShardWriter, input_ids: np.ndarray, with_entropy: bool,
                 loss_mask: np.ndarray | None = None):
        self.writer, self.input_ids, self.with_entropy = writer, input_ids, with_entropy
        self.loss_mask = loss_mask

    def add(self, first_row: int, rows: dict) -> None:
        last_row = first_row + len(rows["logsumexp"])
        rows = {**rows, "input_ids": self.input_ids[first_row:last_row]}
        if self.loss_mask is not None:
            rows["loss_mask"] = self.loss_mask[first_row:last_row]
        if not self.with_entropy:
            rows.pop("entropy", None)
        # libhdf5 can crash on a failed write: stop cleanly while the rows surely fit.
        needed = sum(v.nbytes for v in rows.values()) + 2**16
        if needed > room_under(self.writer.temp_path.parent, self.writer.temp_path):
            raise disk_full(self.writer.path, needed)
        with disk_full_is_a_user_error(self.writer.path):
            self.writer.write_rows(rows)

    def replay(self, parts: CommittedParts) -> None:
        for path, part in parts.parts:
            for r0, rows in iter_part_rows(path):
                self.add(int(part["first_row"]) + r0, rows)


def compute_remaining(config: dict, shard: int, parts: CommittedParts, offsets: np.ndarray,
                      input_ids: np.ndarray, threads: int, sink: ShardSink | None = None) -> dict:
    """Claim a GPU group, run every window not yet committed, commit parts as it goes.

    Writing (part commits, and rows into the shard through ``sink``) happens in a
    writer thread while the next window computes.
    """
    gen, storage = config["generation"], config["storage"]
    batch_tokens = int(gen["batch_tokens"])
    max_length, stride = int(config["tokenize"]["max_length"]), int(config["tokenize"]["stride"])
    scheduler = config["gpu_assignment"] == "scheduler"
    wants_gpu = scheduler or bool(groups_from_config(config["gpus"], config["gpus_per_model"]))
    holder = {"workflow": os.getcwd(), "shard": shard}
    with gpu_claim(
        config["gpus"], config["gpus_per_model"], assignment=config["gpu_assignment"],
        holder=holder, first=shard,
    ) as claim:
        log.info(
            "shard %d: %d samples, %d tokens (%d left); CUDA_VISIBLE_DEVICES=%r on %s%s",
            shard, len(offsets) - 1, int(offsets[-1]), int(offsets[-1]) - parts.rows_done,
            claim.cuda_visible_devices, claim.hostname,
            f" (set by the scheduler, job {scheduler_job_id()})" if scheduler else "",
        )
        committer = PartCommitter(
            parts, claim, int(gen["top_k"]), storage["value_dtype"], bool(gen["store_entropy"]),
            float(gen["commit_every_s"]),
        )
        writer = WriterThread()
        try:
            if sink is not None and parts.parts:
                # Rows an earlier claim committed go into the shard while the teacher loads.
                writer.submit(lambda: sink.replay(parts))
            import torch  # only now: CUDA must see the claimed group, nothing else

            torch.set_num_threads(threads)  # same threads, same reductions: bit-identical reruns
            load_start = time.time()
            head = load_head(config, claim, wants_gpu)
            load_seconds = time.time() - load_start
            log.info("teacher loaded in %.1f s", load_seconds)
            # Padded positions are masked out and never stored, so any valid id pads.
            pad_id = int(head.model.config.pad_token_id or 0)
            run_windows(head, committer, writer, sink, shard, offsets, input_ids, parts,
                        batch_tokens, pad_id, storage["value_dtype"], max_length, stride)
            writer.submit(committer.commit)
            writer.close()
        except BaseException:
            try:
                writer.close()
            except BaseException:
                pass  # the first error is the one to report
            committer.abort()
            raise
        return {"teacher_load_seconds": load_seconds, "rows": committer.rows_computed}


def run_windows(head, committer, writer, sink, shard, offsets, input_ids, parts, batch_tokens,
                pad_id, value_dtype, max_length, stride) -> None:
    first = parts.samples_done
    lengths = np.diff(offsets)
    with progress_bar(int(offsets[-1]), shard, initial=parts.rows_done) as bar:
        # Windows restart at the first uncommitted sample; the greedy split makes
        # them the same windows an uninterrupted run computes, so rows are bit-identical.
        for w0, w1 in windows(lengths[first:], WINDOW_BATCHES * batch_tokens):
            s0, s1 = first + w0, first + w1
            r0, r1 = int(offsets[s0]), int(offsets[s1])
            started = time.time()
            rows = compute_window_split(
                head, input_ids[r0:r1], offsets[s0 : s1 + 1] - r0, batch_tokens, pad_id,
                max_length, stride,
            )
            seconds = time.time() - started

            def write(s0=s0, r0=r0, n=s1 - s0, rows=rows, seconds=seconds):
                rows = rows_in_stored_dtypes(rows, value_dtype)
                committer.add(s0, r0, n, rows, seconds)
                if sink is not None:
                    sink.add(r0, rows)

            writer.submit(write)
            bar.update(r1 - r0)


def open_shard_writer(output: Path, sample_ids, offsets, config: dict,
                      loss_mask: np.ndarray | None = None) -> ShardWriter:
    gen, storage = config["generation"], config["storage"]
    writer = ShardWriter(
        output, num_samples=len(sample_ids), num_tokens=int(offsets[-1]), top_k=int(gen["top_k"]),
        value_dtype=storage["value_dtype"], compression=storage["compression"],
        with_entropy=bool(gen["store_entropy"]),
        with_loss_mask=loss_mask is not None,
        stored_rows=needed_rows(loss_mask, offsets) if gen["store_masked_only"] else None,
    )
    writer.add_samples(sample_ids, np.diff(offsets))
    return writer


def finished_by_an_earlier_job(output: Path, plan: dict, shard: int) -> bool:
    """A job orphaned by a killed Snakemake may have finished this shard while we waited."""
    if not output.exists():
        return False
    try:
        with h5py.File(output, "r") as handle:
            attrs = read_attrs(handle)
    except OSError:
        return False
    return attrs.get("shard_index") == shard and all(
        attrs.get(k) == plan[k] for k in ("config_fingerprint", "teacher_fingerprint")
    )


def part_identity(config: dict, plan: dict, shard: int, sample_ids, offsets, regenerate_token: str):
    plan_digest = hashlib.sha256(sample_ids.tobytes() + offsets.tobytes()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
        "top_k": int(config["generation"]["top_k"]),
        "value_dtype": config["storage"]["value_dtype"],
        "store_entropy": bool(config["generation"]["store_entropy"]),
        "shard_plan": f"{shard}/{plan['num_shards']}:{plan_digest}",
        "regenerate_token": regenerate_token,
    }


def shard_attrs(plan: dict, shard: int, parts: CommittedParts, job_started_at: float,
                teacher_load_seconds: float) -> dict:
    """The finished shard's attributes: fingerprints and provenance of every claim."""
    claims = claims_from_parts([attrs for _, attrs in parts.parts])
    num_tokens = parts.rows_done
    gen_seconds = sum(float(a["compute_seconds"]) for _, a in parts.parts)
    log.info(
        "generated %d tokens in %.1f s of compute (%.0f tokens/s) over %d claim(s); teacher "
        "load took %.1f s in this job", num_tokens, gen_seconds,
        num_tokens / max(gen_seconds, 1e-9), len(claims), teacher_load_seconds,
    )
    last = claims[-1] if claims else {"cuda_visible_devices": "", "hostname": "",
                                       "started_at": job_started_at, "finished_at": time.time()}
    return {
        "shard_index": shard,
        "num_shards": int(plan["num_shards"]),
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
        # The claim that finished the shard; every claim that worked on it is in `claims`.
        "cuda_visible_devices": last["cuda_visible_devices"],
        "hostname": last["hostname"],
        "started_at": last["started_at"],
        "finished_at": last["finished_at"],
        "versions": library_versions(),
        "claims": claims,
        "job_started_at": job_started_at,
        "teacher_load_seconds": teacher_load_seconds,
        "generation_seconds": gen_seconds,
    }


def generate(config: dict, shard: int, tokens_path: str, plan_path: str, regenerate_path: str,
             output: str, threads: int):
    job_started_at = time.time()
    output = Path(output)
    plan = json.loads(Path(plan_path).read_text())
    check_shard_fits(config, plan, shard, output)
    prepared = read_prepared_shard(tokens_path, shard)
    sample_ids, offsets, input_ids = prepared.shard_slice(0)
    loss_mask = prepared.loss_mask
    num_tokens = int(offsets[-1])
    identity = part_identity(
        config, plan, shard, sample_ids, offsets, Path(regenerate_path).read_text().strip()
    )

    with job_lock(output):
        if finished_by_an_earlier_job(output, plan, shard):
            log.info("shard %d was finished by an earlier job while this one waited", shard)
            return
        parts = CommittedParts(parts_dir_for(output), identity, num_tokens)
        expected = {"shard_index": shard, **{k: plan[k] for k in (
            "num_shards", "top_k", "teacher_fingerprint", "tokenizer_fingerprint",
            "config_fingerprint")}}

        def is_valid(path):
            try:
                validate_shard(path, sample_ids, offsets, input_ids, expected, plan["vocab_size"],
                               loss_mask, bool(config["generation"]["store_masked_only"]))
                return True
            except ShardError as exc:
                log.info("%s: %s", path, exc)
                return False

        if parts.take_assembled(output, is_valid):
            return
        this_claim = {"teacher_load_seconds": 0.0, "rows": 0}
        live = open_shard_writer(output, sample_ids, offsets, config, loss_mask)
        sink = ShardSink(live, input_ids, bool(config["generation"]["store_entropy"]), loss_mask)
        try:
            if parts.rows_done < num_tokens:
                this_claim = compute_remaining(config, shard, parts, offsets, input_ids, threads, sink)
            else:  # every row was committed by earlier jobs: copy them into the shard
                sink.replay(parts)
            if parts.rows_done != num_tokens:
                raise RuntimeError(f"shard {shard}: {parts.rows_done} of {num_tokens} rows committed")
            attrs = shard_attrs(plan, shard, parts, job_started_at, this_claim["teacher_load_seconds"])
            with disk_full_is_a_user_error(output):
                live.commit(attrs)
        except BaseException:
            live.abort()
            raise
        parts.keep_assembled(output)


if __name__ == "__main__":  # pragma: no cover - executed by Snakemake
    from workflow_scripts.job import run_job

    run_job(
        "generate",
        snakemake.log[0],  # noqa: F821
        generate,
        snakemake.config,  # noqa: F821
        int(snakemake.wildcards.shard),  # noqa: F821
        snakemake.input.tokens,  # noqa: F821
        snakemake.input.plan,  # noqa: F821
        snakemake.input.regenerate,  # noqa: F821
        snakemake.output.shard,  # noqa: F821
        snakemake.threads,  # noqa: F821
    )
