"""One rank of a tensor-parallel teacher: ``python -m teacher_logits.generation.tensor_rank FD``.

Started by ``tensor_engine`` (the generate job), one per GPU of the claimed group.
It dies with the job (a parent-death signal), holds the group's GPU locks through
descriptors it inherited, and talks to the job over the socket ``FD``: it receives
its ``RankSetup``, answers ``("ready", {"pad_id", "describe"})`` once the model is
loaded, then for each ``("batch", input_ids, attention_mask, uniforms, targets)`` answers
``("rows", TopK fields)`` of its own slice of the vocabulary or ``("oom", message)``; before
it exits on an error, ``("error", message)``. ``("stop",)`` ends it, answered with
``("stopped", {"peak_gpu_bytes"})``.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankSetup:
    rank: int
    world_size: int
    store_port: int
    on_gpu: bool
    threads: int
    teacher: object  # TeacherSettings
    top_k: int
    with_entropy: bool
    temperatures: tuple[float, ...]
    sampling: object = None  # SampleSettings


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this rank when the job dies, however it dies (kill -9 included)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the job died before the signal was armed
        os._exit(1)


def main(fd: int, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    conn = Connection(fd)
    setup: RankSetup = conn.recv()
    try:
        head = load(setup)
    except BaseException as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            fail(
                conn,
                f"out of memory loading its 1/{setup.world_size} of the teacher ({exc}); use "
                "more GPUs per model (gpus_per_model) or a smaller teacher.dtype",
            )
        fail(conn, f"{type(exc).__name__}: {exc}")
    try:
        conn.send(("ready", {"pad_id": head.pad_id, "describe": head.describe()}))
        serve(conn, head)
    except BaseException as exc:
        fail(conn, f"{type(exc).__name__}: {exc}")
    os._exit(0)  # skip interpreter teardown: the job has what it needs


def fail(conn: Connection, message: str) -> None:
    """Tell the job (which logs it) and exit; the traceback goes to the ranks' log."""
    traceback.print_exc()
    try:
        conn.send(("error", message))
    except OSError:
        pass
    os._exit(1)


def serve(conn: Connection, head) -> None:
    import torch

    while True:
        message = conn.recv()
        if message[0] == "stop":
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
            conn.send(("stopped", {"peak_gpu_bytes": peak}))
            return
        _, input_ids, attention_mask, uniforms, targets = message
        try:
            rows = head(
                torch.from_numpy(input_ids),
                torch.from_numpy(attention_mask),
                None if uniforms is None else torch.from_numpy(uniforms),
                None if targets is None else torch.from_numpy(targets),
            )
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            conn.send(("oom", str(exc)))
            continue
        conn.send(
            (
                "rows",
                rows.ids.numpy(),
                rows.logits.numpy(),
                rows.logsumexp.numpy(),
                rows.entropy.numpy(),
                {t: v.numpy() for t, v in rows.logsumexp_t.items()},
                None if rows.draws is None else (rows.draws.numpy(), rows.tail_lse.numpy()),
                None if rows.target_logit is None else rows.target_logit.numpy(),
            )
        )


def load(setup: RankSetup):
    import torch
    import torch.distributed as dist

    from .vocab_slice import VocabSliceHead, load_sharded_teacher

    torch.set_num_threads(setup.threads)
    os.environ.update(
        RANK=str(setup.rank), LOCAL_RANK=str(setup.rank), WORLD_SIZE=str(setup.world_size)
    )
    # Long enough for a 70B teacher's first collectives; a dead peer is caught by the job.
    timeout = datetime.timedelta(minutes=30)
    store = dist.TCPStore("127.0.0.1", setup.store_port, is_master=False, timeout=timeout)
    if setup.on_gpu:
        device = torch.device("cuda", setup.rank)
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            store=store,
            rank=setup.rank,
            world_size=setup.world_size,
            timeout=timeout,
            device_id=device,
        )
    else:
        dist.init_process_group(
            "gloo", store=store, rank=setup.rank, world_size=setup.world_size, timeout=timeout
        )
    model = load_sharded_teacher(setup.teacher, setup.world_size)
    return VocabSliceHead(model, setup)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
