"""Rule ``generate``: one shard of prepared tokens -> the teacher's top-k -> shard file.

Claims a GPU group first (inside the running job, never at plan time), sets
``CUDA_VISIBLE_DEVICES`` to it, and only then imports torch.
"""


import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # Snakemake runs a copy of this file: import from the repository
    sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821

from workflow_scripts.batching import plan_batches, windows  # noqa: E402
from workflow_scripts.gpu_groups import gpu_claim, groups_from_config  # noqa: E402
from workflow_scripts.shard_format import ShardWriter, read_prepared  # noqa: E402

log = logging.getLogger("generate")

# A window of consecutive samples is computed, then written in order. Its size
# trades memory (results are held until written) against how well length sorting
# packs batches.
WINDOW_BATCHES = 32


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


def progress_bar(total_tokens: int, shard: int, every_s: float = 30.0):
    """A tqdm bar over tokens with tokens/s and ETA, as one log line every ``every_s``."""
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"shard {shard}",
        file=_LogStream(),
        mininterval=every_s,
        ascii=True,
        ncols=100,
    )


def compute_window(head, input_ids: np.ndarray, offsets: np.ndarray, batch_tokens: int, pad_id: int):
    """Top-k rows of the samples in one window, concatenated in sample order."""
    import torch

    lengths = np.diff(offsets)
    num_rows = int(offsets[-1])
    out_ids = np.empty((num_rows, head.top_k), dtype=np.int32)
    out_logits = np.empty((num_rows, head.top_k), dtype=np.float32)
    out_lse = np.empty(num_rows, dtype=np.float32)
    out_entropy = np.empty(num_rows, dtype=np.float32)
    for batch in plan_batches(lengths, batch_tokens):
        width = int(lengths[batch].max())
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sample in enumerate(batch):
            start, stop = offsets[sample], offsets[sample + 1]
            ids[row, : stop - start] = torch.from_numpy(input_ids[start:stop].astype(np.int64))
            mask[row, : stop - start] = 1
        result = head(ids, mask)
        # Valid positions come back row-major: sample by sample in batch order.
        cursor = 0
        for sample in batch:
            start, stop = int(offsets[sample]), int(offsets[sample + 1])
            n = stop - start
            out_ids[start:stop] = result.ids[cursor : cursor + n].numpy()
            out_logits[start:stop] = result.logits[cursor : cursor + n].numpy()
            out_lse[start:stop] = result.logsumexp[cursor : cursor + n].numpy()
            out_entropy[start:stop] = result.entropy[cursor : cursor + n].numpy()
            cursor += n
    return out_ids, out_logits, out_lse, out_entropy


def scheduler_job_id() -> str | None:
    """The cluster's id for this job (SLURM's, or another scheduler's), for provenance."""
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def load_head(config: dict, claim, wants_gpu: bool):
    """Load the teacher on the claimed GPUs (or CPU) and wrap it in the top-k head."""
    import torch

    from workflow_scripts.job import UserError
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
    return TopKHead(model, int(config["generation"]["top_k"]))


def write_rows(head, writer, sample_ids, offsets, input_ids, batch_tokens: int, shard: int):
    """Run every window of the shard through the teacher and write it, in sample order."""
    # Padded positions are masked out and never stored, so any valid id pads.
    pad_id = int(head.model.config.pad_token_id or 0)
    with progress_bar(int(offsets[-1]), shard) as bar:
        for s0, s1 in windows(np.diff(offsets), WINDOW_BATCHES * batch_tokens):
            r0, r1 = int(offsets[s0]), int(offsets[s1])
            ids, logits, lse, entropy = compute_window(
                head, input_ids[r0:r1], offsets[s0 : s1 + 1] - r0, batch_tokens, pad_id
            )
            rows = {"input_ids": input_ids[r0:r1], "topk_ids": ids, "topk_logits": logits,
                    "logsumexp": lse, "entropy": entropy}  # h5py casts to the stored dtypes
            writer.write_block(sample_ids[s0:s1], np.diff(offsets[s0 : s1 + 1]), rows)
            bar.update(r1 - r0)


def generate(config: dict, shard: int, tokens_path: str, plan_path: str, output: str, threads: int):
    job_started_at = time.time()
    plan = json.loads(Path(plan_path).read_text())
    sample_ids, offsets, input_ids = read_prepared(tokens_path).shard_slice(shard)
    num_tokens = int(offsets[-1])
    gen, storage = config["generation"], config["storage"]
    scheduler = config["gpu_assignment"] == "scheduler"
    wants_gpu = scheduler or bool(groups_from_config(config["gpus"], config["gpus_per_model"]))
    holder = {"workflow": os.getcwd(), "output": str(output), "shard": shard}

    with gpu_claim(
        config["gpus"], config["gpus_per_model"], assignment=config["gpu_assignment"],
        holder=holder, first=shard,
    ) as claim:
        log.info(
            "shard %d: %d samples, %d tokens; CUDA_VISIBLE_DEVICES=%r on %s%s",
            shard, len(sample_ids), num_tokens, claim.cuda_visible_devices, claim.hostname,
            f" (set by the scheduler, job {scheduler_job_id()})" if scheduler else "",
        )
        import torch  # only now: CUDA must see the claimed group, nothing else

        torch.set_num_threads(threads)  # same threads, same reductions: bit-identical reruns
        load_start = time.time()
        head = load_head(config, claim, wants_gpu)
        load_seconds = time.time() - load_start
        log.info("teacher loaded in %.1f s", load_seconds)

        writer = ShardWriter(
            output, num_samples=len(sample_ids), num_tokens=num_tokens, top_k=int(gen["top_k"]),
            value_dtype=storage["value_dtype"], compression=storage["compression"],
            with_entropy=bool(gen["store_entropy"]),
        )
        gen_start = time.time()
        try:
            write_rows(head, writer, sample_ids, offsets, input_ids, int(gen["batch_tokens"]), shard)
            finished_at = time.time()
            gen_seconds = finished_at - gen_start
            log.info(
                "generated %d tokens in %.1f s (%.0f tokens/s); teacher load took %.1f s "
                "(%.0f%% of the job)",
                num_tokens, gen_seconds, num_tokens / max(gen_seconds, 1e-9), load_seconds,
                100 * load_seconds / max(load_seconds + gen_seconds, 1e-9),
            )
            claim_record = {
                "cuda_visible_devices": claim.cuda_visible_devices,
                "hostname": claim.hostname,
                "started_at": claim.started_at,
                "finished_at": finished_at,
                "rows": num_tokens,
            }
            if scheduler:
                claim_record["scheduler_job_id"] = scheduler_job_id()
            writer.commit(
                {
                    "shard_index": shard,
                    "num_shards": int(plan["num_shards"]),
                    "teacher_fingerprint": plan["teacher_fingerprint"],
                    "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
                    "config_fingerprint": plan["config_fingerprint"],
                    "cuda_visible_devices": claim.cuda_visible_devices,
                    "hostname": claim.hostname,
                    "started_at": claim.started_at,
                    "finished_at": finished_at,
                    "versions": library_versions(),
                    "claims": [claim_record],
                    "job_started_at": job_started_at,
                    "teacher_load_seconds": load_seconds,
                    "generation_seconds": gen_seconds,
                }
            )
        except BaseException:
            writer.abort()
            raise


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
        snakemake.output.shard,  # noqa: F821
        snakemake.threads,  # noqa: F821
    )
