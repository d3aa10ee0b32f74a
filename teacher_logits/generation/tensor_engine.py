"""The tensor-parallel engine, job side: one rank per GPU of the claimed group.

The generate job is not a rank: it keeps the claim, the writer, part commits and
resume exactly as with the pipeline engine. It starts ``gpus_per_model`` rank
processes (``tensor_rank``), hands each the same padded batch and merges their
per-slice top-k, logsumexp and entropy (``topk.merge_slices``), so full logits
are not gathered anywhere (unless a rank's probe finds its slice of the head does not
reproduce the model's logits: ``vocab_slice``).

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
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from ..errors import TeacherError
from ..layout import rank_log_for
from .tensor_rank import RankSetup
from .topk import TopK, choice_uniforms, draw_uniforms, merge_slices

log = logging.getLogger("generate")

# How long ranks get to answer once one of them has reported a failure (after that
# they are taken to be stuck in a collective the failed rank never joined), and to
# exit after "stop".
RANK_GRACE_S = 20.0


class RankFailed(TeacherError):
    pass


class RanksStuck(RankFailed):
    """A rank ran out of memory and another did not answer: it waits in a collective."""


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
        rank = cls(index, process, conn)
        try:
            conn.send(setup)
        except BaseException:
            rank.kill()  # it holds the group's lock descriptors
            raise
        return rank

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
    def __init__(self, settings, claim, on_gpu: bool):
        self.top_k, self.with_entropy = settings.top_k, settings.store_entropy
        # The ranks draw over their slices; the job merges the draws.
        self.sampling = settings.sampling
        self.world = settings.tensor_ranks
        # Each rank gets its share of the job's threads.
        self.threads = max(1, settings.threads // self.world)
        self._settings, self._claim, self._on_gpu = settings, claim, on_gpu
        self.ranks: list[RankProcess] = []
        self.pad_id = 0
        self.peak_gpu_bytes: list[int] = []
        self.rank_log: Path | None = None
        self._store = None
        self._broken = True  # until the ranks are up

    @property
    def description(self) -> str:
        return f"tensor x{self.world}"

    @classmethod
    def start(cls, settings, claim, on_gpu: bool) -> TensorParallelEngine:
        """Start one rank per GPU of the group and wait until each has loaded its part."""
        from ..tensor_plan import check_teacher_splits

        # Once, here: each rank loading the path as given would follow a symlink seconds
        # later, on its own, to whatever folder it then names.
        teacher = settings.teacher.resolved()
        settings = replace(settings, teacher=teacher)
        check_teacher_splits(
            teacher.path, settings.tensor_ranks, settings.top_k, teacher.trust_remote_code
        )
        if teacher.max_memory or teacher.allow_offload:
            log.info(
                "teacher.max_memory and teacher.allow_offload apply to the pipeline engine only: "
                "each tensor-parallel rank holds its 1/%d of every layer",
                settings.tensor_ranks,
            )
        engine = cls(settings, claim, on_gpu)
        engine._launch()
        return engine

    def _launch(self) -> None:
        import torch.distributed as dist

        # Served here on a free port: any number of groups start at once on one machine.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        env = rank_environment(self.threads, self._on_gpu)
        log_file = job_log_file()
        self.rank_log = rank_log_for(log_file) if log_file is not None else None
        # Appended: a rerun keeps the traceback an earlier job's log points to.
        output = open(self.rank_log, "a") if self.rank_log else None
        self.ranks, self._broken = [], False
        try:
            for index in range(self.world):
                setup = RankSetup(
                    rank=index,
                    world_size=self.world,
                    store_port=self._store.port,
                    on_gpu=self._on_gpu,
                    threads=self.threads,
                    teacher=self._settings.teacher,
                    top_k=self.top_k,
                    with_entropy=self.with_entropy,
                    temperatures=tuple(self._settings.temperatures),
                    sampling=self._settings.sampling,
                )
                self.ranks.append(
                    RankProcess.spawn(index, setup, self._claim.lock_fds, env, output)
                )
            ready = self._answers()
        except BaseException:
            self._kill()
            raise
        finally:
            if output is not None:
                output.close()
        self.pad_id = ready[0]["pad_id"]
        log.info(
            "tensor-parallel teacher: %d ranks of %d threads, %s",
            self.world,
            self.threads,
            "; ".join(f"rank {i}: {a['describe']}" for i, a in sorted(ready.items())),
        )

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_keys=None, targets=None
    ) -> TopK:
        uniforms = draw_uniforms(self.sampling.draws, row_keys)
        targets = None if targets is None else torch.as_tensor(targets, dtype=torch.long).numpy()
        try:
            self._send_all(
                (
                    "batch",
                    input_ids.numpy(),
                    attention_mask.numpy(),
                    None if uniforms is None else uniforms.numpy(),
                    targets,
                )
            )
            answers = self._answers()
        except RanksStuck as exc:
            # Their collectives no longer line up: start the ranks afresh, and the caller
            # retries the batch as two halves as after any out-of-memory.
            log.warning("%s; starting the ranks again", exc)
            self._kill()
            self._launch()
            raise torch.OutOfMemoryError(str(exc)) from None
        except BaseException:
            self._kill()
            raise
        ooms = [a["oom"] for a in answers.values() if "oom" in a]
        if ooms:  # every rank is back at its loop: the batch can be retried smaller
            raise torch.OutOfMemoryError(ooms[0])
        slices = [answers[i]["rows"] for i in range(len(self.ranks))]
        return merge_slices(
            slices,
            self.top_k,
            self.with_entropy,
            choice_uniforms(self.sampling.draws, row_keys),
            self.sampling.temperature,
        )

    def _send_all(self, message: tuple) -> None:
        for rank in self.ranks:
            try:
                rank.conn.send(message)
            except OSError:  # its end is closed: it died
                raise self._died(rank) from None

    def _died(self, rank: RankProcess) -> RankFailed:
        return RankFailed(
            f"tensor-parallel rank {rank.index} (pid {rank.process.pid}) {rank.death()}"
            f"{self._see_output()}. Run the same command again: it resumes from the last "
            "committed part"
        )

    def _answers(self) -> dict[int, dict]:
        """One answer from every rank. A rank that dies, or fails, fails the batch; once
        one has run out of memory, the others get ``RANK_GRACE_S`` to answer."""
        pending = {rank.conn: rank for rank in self.ranks}
        answers: dict[int, dict] = {}
        deadline = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(pending), timeout=timeout)
            if not ready:
                raise RanksStuck(
                    f"tensor-parallel ranks {sorted(r.index for r in pending.values())} did "
                    f"not answer within {RANK_GRACE_S:.0f} s of another rank running out of "
                    "memory"
                )
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    answer = decode(conn.recv())
                except (EOFError, OSError):
                    raise self._died(rank) from None
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
                self._send_all(("stop",))
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
        *columns, tempered, drawn, target = message[1:]
        tensors = [torch.from_numpy(column) for column in columns]
        tempered = {t: torch.from_numpy(v) for t, v in tempered.items()}
        draws = {}
        if drawn is not None:
            draws = dict(draws=torch.from_numpy(drawn[0]), tail_lse=torch.from_numpy(drawn[1]))
        if target is not None:
            draws["target_logit"] = torch.from_numpy(target)
        return {"rows": TopK(*tensors, logsumexp_t=tempered, **draws)}
    if kind in ("ready", "stopped"):
        return message[1]
    return {kind: message[1]}
