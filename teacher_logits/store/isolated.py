"""Run shard checks in worker processes, so a crash inside libhdf5 names the shard.

libhdf5 trusts a file's metadata: some flipped bytes in an object header make it
dereference garbage and kill the whole process (SIGSEGV), which no Python
``except`` can catch. Gather and ``verify --deep`` therefore read shards only in
forked workers. A worker that dies is replaced, and its shard is reported as
corrupt with the signal that killed it; the other shards are still checked.
Several workers also check shards in parallel.

Needs only the standard library: the check function itself brings h5py.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from ..errors import ShardError

# fork, not spawn: workers inherit the parent's expected arrays (prepare's tokens)
# without pickling them, and start in milliseconds.
_CONTEXT = multiprocessing.get_context("fork")

# A check reports progress after every block it reads (well under a second of
# work); this long without any means libhdf5 is spinning on corrupt metadata
# (seen: a flipped byte in a global heap object's size) or the file system hangs.
STALL_ENV = "TEACHER_LOGITS_CHECK_STALL_S"
DEFAULT_STALL_S = 300.0


@dataclass
class CheckResult:
    item: Any
    value: Any = None  # what the check returned, when it passed
    error: str | None = None  # one line saying what is wrong, when it failed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _serve(check: Callable[[Any, Callable[[], None]], Any], conn) -> None:
    """Worker loop: receive an item, send ("progress", None)* then ("ok", value) or ("error", message)."""

    def progress():
        conn.send(("progress", None))

    # The parent reports a crash as one line; a Python stack dump would only add noise.
    faulthandler.disable()

    while True:
        try:
            item = conn.recv()
        except EOFError:
            break
        if item is None:
            break
        try:
            reply = ("ok", check(item, progress))
        except ShardError as exc:
            reply = ("error", _one_line(exc))
        except BaseException as exc:  # noqa: BLE001 - MemoryError and the like, as one line
            reply = ("error", _one_line(f"unreadable ({type(exc).__name__}: {exc})"))
        conn.send(reply)
    conn.close()


def stall_seconds() -> float:
    return float(os.environ.get(STALL_ENV) or DEFAULT_STALL_S)


def crash_message(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"killed by {name}"
    else:
        how = f"exited with status {exitcode}"
    return (
        f"the HDF5 library crashed reading it ({how}): its metadata is corrupt "
        "(or the checking process ran out of memory)"
    )


class _Worker:
    def __init__(self, check):
        self.conn, child_conn = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_serve, args=(check, child_conn), daemon=True)
        self.process.start()
        child_conn.close()
        self.item = None
        self.busy = False

    def send(self, item) -> None:
        self.item, self.busy = item, True
        self.last_progress = time.monotonic()
        self.conn.send(item)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.conn.close()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def check_isolated(
    check: Callable[[Any, Callable[[], None]], Any],
    items: Iterable,
    workers: int = 1,
    stall_s: float | None = None,
) -> Iterator[CheckResult]:
    """``check(item, progress)`` for every item in worker processes; results in completion order.

    ``check`` raises ``ShardError`` for a bad item and calls ``progress()`` now and
    then; any other exception, a crash of the worker, or ``stall_s`` seconds without
    progress becomes a ``CheckResult`` with ``error`` set as well.
    """
    stall_s = stall_seconds() if stall_s is None else stall_s
    pending = list(items)[::-1]
    pool = [_Worker(check) for _ in range(max(1, min(workers, len(pending))))]
    try:
        for worker in pool:
            if pending:
                worker.send(pending.pop())
        while any(w.busy for w in pool):
            busy = [w for w in pool if w.busy]
            now = time.monotonic()
            timeout = max(0.0, min(w.last_progress for w in busy) + stall_s - now)
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout)
            for index, worker in enumerate(pool):
                if not worker.busy:
                    continue
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    if time.monotonic() - worker.last_progress < stall_s:
                        continue
                    worker.process.kill()
                    worker.process.join()
                    yield CheckResult(
                        worker.item,
                        error=(
                            f"reading it made no progress for {stall_s:g} s, so the HDF5 library "
                            "is stuck on corrupt metadata (or the file system hangs)"
                        ),
                    )
                    worker.conn.close()
                    worker = pool[index] = _Worker(check)
                    if pending:
                        worker.send(pending.pop())
                    continue
                try:
                    # A worker may exit right after replying: read the reply first.
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):
                    worker.process.join()
                    yield CheckResult(worker.item, error=crash_message(worker.process.exitcode))
                    worker.conn.close()
                    worker = pool[index] = _Worker(check)
                else:
                    if kind == "progress":
                        worker.last_progress = time.monotonic()
                        continue
                    worker.busy = False
                    if kind == "ok":
                        yield CheckResult(worker.item, value=value)
                    else:
                        yield CheckResult(worker.item, error=value)
                if pending:
                    worker.send(pending.pop())
    finally:
        for worker in pool:
            worker.stop()


def check_batched(
    check: Callable[[Any], Any], items: Iterable, workers: int | None = None, batch: int = 64
) -> Iterator[CheckResult]:
    """``check(item)`` for many cheap items (a quick look at each of 10,000 shards) in worker
    processes, ``batch`` items per message; results in completion order. ``check`` raises
    ``ShardError`` for a bad item. A batch whose worker crashes is checked again item by
    item, so the crash names its item and the others still get their results."""
    items = list(items)
    workers = default_workers(workers)

    def run(chunk, progress):
        out = []
        for item in chunk:
            try:
                out.append(CheckResult(item, value=check(item)))
            except ShardError as exc:
                out.append(CheckResult(item, error=_one_line(exc)))
            except Exception as exc:  # noqa: BLE001 - corrupt metadata, as one line
                out.append(
                    CheckResult(item, error=_one_line(f"unreadable ({type(exc).__name__}: {exc})"))
                )
            progress()
        return out

    chunks = [tuple(items[i : i + batch]) for i in range(0, len(items), batch)]
    for result in check_isolated(run, chunks, workers):
        if result.error is None:
            yield from result.value
        elif len(result.item) == 1:
            yield CheckResult(result.item[0], error=result.error)
        else:
            yield from check_batched(check, result.item, workers, batch=1)


def default_workers(requested: int | None = None) -> int:
    if requested:
        return max(1, int(requested))
    return max(1, min(8, len(os.sched_getaffinity(0))))
