"""The tensor-parallel engine, job side: one rank per GPU of the claimed group.

The generate job is not a rank: it keeps the claim, the writer, part commits and
resume exactly as with the pipeline engine. It starts ``gpus_per_model`` rank
processes (``tensor_rank``), hands each the same padded batch and merges their
per-slice top-k, logsumexp and entropy (``topk.merge_slices``), so full logits
are never gathered anywhere.

Failure behaviour:
- the ranks inherit the claim's lock descriptors, so the group stays locked while
  any rank lives, and they die with the job (a parent-death signal), so a
  ``kill -9`` of the job leaves no rank behind;
- a rank that dies closes its socket: the job sees it at once, kills the other
  ranks (stuck in a collective, they would wait for the collective's timeout)
  and fails with the rank's exit status; committed parts are kept for the rerun;
- rendezvous is a store the job serves on a free port, so groups on one machine
  never collide.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from ..errors import TeacherError
from ..layout import rank_log_for
from .tensor_rank import RankSetup
from .topk import TopK, merge_slices

log = logging.getLogger("generate")

# How long ranks get to answer once one of them has reported a failure (after that
# they are taken to be stuck in a collective the failed rank never joined), and to
# exit after "stop".
RANK_GRACE_S = 20.0


class RankFailed(TeacherError):
    pass


class RankProcess:
    """One rank: its process and the job's end of its socket."""

    def __init__(self, index: int, process: subprocess.Popen, conn: Connection):
        self.index, self.process, self.conn = index, process, conn

    @classmethod
    def spawn(cls, index: int, setup: RankSetup, lock_fds, env: dict, output) -> RankProcess:
        job_end, rank_end = socket.socketpair()
        with rank_end:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "teacher_logits.generation.tensor_rank",
                    str(rank_end.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(rank_end.fileno(), *lock_fds),
                env=env,
                stdout=output,
                stderr=output,
            )
        conn = Connection(job_end.detach())
        conn.send(setup)
        return cls(index, process, conn)

    def death(self) -> str:
        """What ended the rank, once its socket closed."""
        try:
            code = self.process.wait(timeout=RANK_GRACE_S)
        except subprocess.TimeoutExpired:
            return "closed its socket but is still running"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


def job_log_file() -> Path | None:
    """The log file ``run_job`` set up for this job, if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def rank_environment(threads: int, on_gpu: bool) -> dict:
    env = dict(os.environ)
    # The ranks import this checkout's library, whatever their working directory.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    if not on_gpu:
        # Single-node only: gloo on loopback, whatever the host name resolves to.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


class TensorParallelEngine:
    def __init__(self, ranks: list[RankProcess], store, top_k: int, with_entropy: bool):
        self.ranks, self._store = ranks, store
        self.top_k, self.with_entropy = top_k, with_entropy
        self.pad_id = 0
        self.peak_gpu_bytes: list[int] = []
        self.rank_log: Path | None = None
        self._broken = False

    @property
    def description(self) -> str:
        return f"tensor x{len(self.ranks)}"

    @classmethod
    def start(cls, settings, claim, on_gpu: bool) -> TensorParallelEngine:
        """Start one rank per GPU of the group and wait until each has loaded its part."""
        import torch.distributed as dist

        from ..tensor_plan import check_teacher_splits

        world = settings.tensor_ranks
        teacher = settings.teacher
        check_teacher_splits(teacher.path, world, settings.top_k, teacher.trust_remote_code)
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        threads = max(1, settings.threads // world)
        env = rank_environment(threads, on_gpu)
        ranks: list[RankProcess] = []
        engine = cls(ranks, store, settings.top_k, settings.store_entropy)
        log_file = job_log_file()
        if log_file is not None:
            engine.rank_log = rank_log_for(log_file)
            output = open(engine.rank_log, "w")  # the ranks' copies outlive this one
        else:
            output = None  # the job's own stderr
        try:
            for index in range(world):
                setup = RankSetup(
                    rank=index,
                    world_size=world,
                    store_port=store.port,
                    on_gpu=on_gpu,
                    threads=threads,
                    teacher=teacher,
                    top_k=settings.top_k,
                    with_entropy=settings.store_entropy,
                    temperatures=tuple(settings.temperatures),
                    chunk_bytes=0,
                )
                ranks.append(RankProcess.spawn(index, setup, claim.lock_fds, env, output))
            ready = engine._answers()
            engine.pad_id = ready[0]["pad_id"]
            log.info(
                "tensor-parallel teacher: %d ranks of %d threads, %s",
                world,
                threads,
                "; ".join(f"rank {i}: {a['describe']}" for i, a in sorted(ready.items())),
            )
        except BaseException:
            engine._kill()
            raise
        finally:
            if output is not None:
                output.close()
        return engine

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TopK:
        batch = ("batch", input_ids.numpy(), attention_mask.numpy())
        try:
            for rank in self.ranks:
                rank.conn.send(batch)
            answers = self._answers()
        except BaseException:
            self._kill()
            raise
        ooms = [a["oom"] for a in answers.values() if "oom" in a]
        if ooms:  # every rank is back at its loop: the batch can be retried smaller
            raise torch.OutOfMemoryError(ooms[0])
        slices = [answers[i]["rows"] for i in range(len(self.ranks))]
        return merge_slices(slices, self.top_k, self.with_entropy)

    def _answers(self) -> dict[int, dict]:
        """One answer from every rank. A rank that dies, or fails, fails the batch; once
        one has failed, the others get ``RANK_GRACE_S`` to answer."""
        pending = {rank.conn: rank for rank in self.ranks}
        answers: dict[int, dict] = {}
        deadline = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(pending), timeout=timeout)
            if not ready:
                raise RankFailed(
                    f"tensor-parallel ranks {sorted(r.index for r in pending.values())} did "
                    f"not answer within {RANK_GRACE_S:.0f} s of another rank's failure; lower "
                    "generation.batch_tokens, or set teacher.parallel: pipeline"
                )
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    answer = decode(conn.recv())
                except (EOFError, OSError):
                    raise RankFailed(
                        f"tensor-parallel rank {rank.index} (pid {rank.process.pid}) "
                        f"{rank.death()}{self._see_output()}. Run the same command again: "
                        "it resumes from the last committed part"
                    ) from None
                if "error" in answer:
                    raise RankFailed(
                        f"tensor-parallel rank {rank.index}: {answer['error']}{self._see_output()}"
                    )
                if "oom" in answer and deadline is None:
                    deadline = time.monotonic() + RANK_GRACE_S
                answers[rank.index] = answer
        return answers

    def _see_output(self) -> str:
        return f" (the ranks' output: {self.rank_log})" if self.rank_log else ""

    def close(self) -> None:
        """Stop the ranks: politely when they are healthy (each says its peak GPU memory,
        logged), SIGKILL otherwise."""
        if not self._broken:
            try:
                for rank in self.ranks:
                    rank.conn.send(("stop",))
                stopped = self._answers()
                self.peak_gpu_bytes = [stopped[i]["peak_gpu_bytes"] for i in sorted(stopped)]
                if any(self.peak_gpu_bytes):
                    log.info(
                        "peak GPU memory per rank: %s",
                        ", ".join(f"{b / 2**30:.1f} GiB" for b in self.peak_gpu_bytes),
                    )
                end = time.monotonic() + RANK_GRACE_S
                for rank in self.ranks:
                    rank.process.wait(timeout=max(0.0, end - time.monotonic()))
            except (OSError, RankFailed, subprocess.TimeoutExpired) as exc:
                log.warning("tensor-parallel ranks did not stop cleanly (%s); killing them", exc)
        self._kill()

    def _kill(self) -> None:
        self._broken = True
        for rank in self.ranks:
            rank.kill()


def decode(message: tuple) -> dict:
    """A rank's message as a dict (see ``tensor_rank`` for the protocol)."""
    kind = message[0]
    if kind == "rows":
        *columns, tempered = message[1:]
        tensors = [torch.from_numpy(column) for column in columns]
        tempered = {t: torch.from_numpy(v) for t, v in tempered.items()}
        return {"rows": TopK(*tensors, logsumexp_t=tempered)}
    if kind in ("ready", "stopped"):
        return message[1]
    return {kind: message[1]}
