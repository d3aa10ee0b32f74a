"""The engine seam: the one interface the generation loop talks to.

An engine is loaded on the claimed group, is called on one padded batch (int64
``input_ids`` and ``attention_mask``, [batch, width]) and returns the ``TopK``
rows of its valid positions in row-major order, and is closed once. It has
``top_k``, ``pad_id`` and a ``description`` (recorded with each claim). Resume,
part commits, writing and out-of-memory splitting live outside it, so another
engine plugs in here without touching them.

- ``pipeline`` (``teacher.TopKHead``): one process; ``device_map="auto"`` spreads
  the layers over the group's GPUs, which take turns.
- ``tensor`` (``tensor_engine.TensorParallelEngine``): one rank per GPU of the
  group, each holding a slice of every layer (transformers' tensor-parallel plan).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from ..errors import TeacherError
from .topk import TopK


class Engine(Protocol):
    top_k: int
    description: str

    @property
    def pad_id(self) -> int: ...

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_keys=None, targets=None
    ) -> TopK:
        """``row_keys`` seed the sampled modes' draws; ``targets`` (each valid position's
        next token id, -1: none) ask for ``TopK.target_logit``."""

    def close(self) -> None: ...


@contextmanager
def open_engine(settings, claim) -> Iterator[Engine]:
    """The device policy: the teacher on the claimed GPUs (or the CPU), closed after the block.

    ``settings`` is a ``GenerateSettings``; ``claim`` the GPU group this job holds.
    """
    on_gpu = runs_on_gpu(settings.devices, claim)
    if settings.tensor_ranks > 1:
        from .tensor_engine import TensorParallelEngine

        engine = TensorParallelEngine.start(settings, claim, on_gpu)
    else:
        engine = load_pipeline(settings, on_gpu)
    try:
        yield engine
    finally:
        engine.close()


def load_pipeline(settings, on_gpu: bool):
    from .teacher import TopKHead, load_teacher

    teacher = settings.teacher
    model = load_teacher(
        str(teacher.path),
        dtype=teacher.dtype,
        attn_implementation=teacher.attn_implementation,
        trust_remote_code=teacher.trust_remote_code,
        max_memory=teacher.max_memory,
        allow_offload=teacher.allow_offload,
        on_gpu=on_gpu,
    )
    return TopKHead(
        model,
        settings.top_k,
        with_entropy=settings.store_entropy,
        temperatures=settings.temperatures,
        sampling=settings.sampling,
    )


def runs_on_gpu(plan, claim) -> bool:
    """Whether the teacher goes on GPUs; a clear error when it should and cannot."""
    scheduler = plan.mode == "scheduler"
    # A scheduler that sets no mask (whole-node allocations) leaves every GPU visible.
    on_gpu = torch.cuda.is_available() and (claim.cuda_visible_devices != "" or scheduler)
    if plan.wants_gpu and not on_gpu and not plan.allow_cpu:
        if scheduler:
            raise TeacherError(
                f"the scheduler gave this job CUDA_VISIBLE_DEVICES={claim.cuda_visible_devices!r} "
                "but CUDA sees no GPU; run generate on a GPU partition (it asks for "
                "gpus_per_model GPUs), or set allow_cpu=true to run on CPU"
            )
        raise TeacherError(
            f"CUDA_VISIBLE_DEVICES={claim.cuda_visible_devices!r} but CUDA sees no GPU; "
            "check the driver, or set allow_cpu=true to run on CPU"
        )
    return on_gpu
