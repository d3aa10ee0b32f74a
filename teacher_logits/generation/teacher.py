"""The teacher: load it, run a padded batch, keep per-token top-k and logsumexp (at
temperature 1 and at each extra ``generation.temperatures`` entry).

Knows nothing of files or Snakemake. The full ``[tokens, vocab]`` logits are never
materialised in float32: rows go through the output head in chunks of
``chunk_rows``, so the memory of the top-k step is bounded by the chunk, not by
batch x sequence x vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import TeacherError
from ..store.format import extra_temperatures

log = logging.getLogger(__name__)

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "auto": "auto",
}

# float32 bytes one top-k chunk may hold: rows x vocab x 4 <= this.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


@dataclass
class TopK:
    """Results for the valid (unpadded) positions of a batch, row-major by sample."""

    ids: torch.Tensor  # int32 [N, k]
    logits: torch.Tensor  # float32 [N, k], most likely first
    logsumexp: torch.Tensor  # float32 [N]
    entropy: torch.Tensor  # float32 [N]
    # Temperature T (other than 1) -> float32 [N] logsumexp(logits / T).
    logsumexp_t: dict = field(default_factory=dict)


def load_teacher(
    path: str,
    dtype: str = "bfloat16",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
    allow_offload: bool = False,
    on_gpu: bool = False,
):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=DTYPES[dtype],
        device_map="auto" if on_gpu else "cpu",
        trust_remote_code=trust_remote_code,
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if max_memory:
        kwargs["max_memory"] = max_memory
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    if on_gpu:
        refuse_offload(
            getattr(model, "hf_device_map", None), model.get_memory_footprint(), allow_offload
        )
    return model


def refuse_offload(device_map: dict | None, weight_bytes: int, allow_offload: bool) -> None:
    """device_map="auto" silently puts layers on CPU or disk when the GPUs are too small,
    which runs very slowly: an error unless the user allowed it."""
    offloaded = sorted({str(d) for d in (device_map or {}).values() if str(d) in ("cpu", "disk")})
    if offloaded and not allow_offload:
        raise TeacherError(
            f"the teacher (~{weight_bytes / 2**30:.1f} GiB of weights) does not fit the GPUs of "
            f"this group: device_map='auto' put layers on {offloaded}, which runs very slowly. Use "
            "more GPUs per model (gpus_per_model), a smaller dtype, or set teacher.allow_offload: true"
        )


def load_top_k_head(settings, claim):
    """The device policy: load the teacher on the claimed GPUs (or the CPU) as a top-k head.

    ``settings`` is a ``GenerateSettings``; ``claim`` the GPU group this job holds.
    """
    plan, teacher = settings.devices, settings.teacher
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
    )


class TopKHead:
    """Runs the body once and the output head in row chunks.

    The chunked head is used only when it reproduces ``model(...).logits`` bit for
    bit on a probe batch; architectures that change logits after ``lm_head`` (final
    soft-capping, logit scaling) fall back to the model's own forward, still reduced
    to top-k in chunks.
    """

    def __init__(
        self,
        model,
        top_k: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        with_entropy: bool = True,
        temperatures=(1.0,),
    ):
        self.model = model
        self.top_k = top_k
        # The entropy costs one more pass over each logits chunk (~13% of lm_head + top-k).
        self.with_entropy = with_entropy
        # Each costs one exp pass more over each chunk, no more memory than the entropy's.
        self.extra_temperatures = extra_temperatures(temperatures)
        self.head = model.get_output_embeddings()
        self.body = model.base_model
        self.vocab_size = self.head.weight.shape[0] if self.head is not None else None
        self.input_device = model.get_input_embeddings().weight.device
        vocab = self.vocab_size or model.config.vocab_size
        self.chunk_rows = max(1, chunk_bytes // (int(vocab) * 4))
        self.chunked = self.head is not None and self._chunked_head_matches()
        log.info(
            "top-k via %s, %d rows per chunk",
            "chunked output head"
            if self.chunked
            else "the model's own forward (head not chunkable)",
            self.chunk_rows,
        )

    @torch.inference_mode()
    def _chunked_head_matches(self) -> bool:
        vocab = int(self.model.config.vocab_size)
        ids = (torch.arange(8, device=self.input_device) * 7919 % vocab).unsqueeze(0)
        mask = torch.ones_like(ids)
        try:
            full = self.model(input_ids=ids, attention_mask=mask).logits
            hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
            return torch.equal(full, self.head(hidden.to(self.head.weight.device)))
        except Exception as exc:  # any mismatch in structure means: do not chunk
            log.info("chunked head probe failed (%s); using the model's forward", exc)
            return False

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TopK:
        input_ids = input_ids.to(self.input_device)
        attention_mask = attention_mask.to(self.input_device)
        if self.chunked:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = hidden[attention_mask.to(hidden.device).bool()]
            project = self.head
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            rows = logits[attention_mask.to(logits.device).bool()]
            project = None
        return self._reduce(rows, project)

    def _reduce(self, rows: torch.Tensor, project) -> TopK:
        n, k = rows.shape[0], self.top_k
        device = self.head.weight.device if project is not None else rows.device
        out_ids = torch.empty((n, k), dtype=torch.int32, device=device)
        out_values = torch.empty((n, k), dtype=torch.float32, device=device)
        out_lse = torch.empty(n, dtype=torch.float32, device=device)
        out_entropy = torch.empty(n, dtype=torch.float32, device=device)
        temperatures = self.extra_temperatures
        out_tempered = [torch.empty(n, dtype=torch.float32, device=device) for _ in temperatures]
        for start in range(0, n, self.chunk_rows):
            stop = min(n, start + self.chunk_rows)
            chunk = rows[start:stop]
            if project is not None:
                chunk = project(chunk.to(device))
            chunk = chunk.float()
            values, ids = torch.topk(chunk, k, dim=-1, sorted=True)
            out_values[start:stop] = values
            out_ids[start:stop] = ids
            top = values[:, :1]
            if self.with_entropy:
                reduce_chunk(chunk, top, out_lse[start:stop], out_entropy[start:stop])
            else:
                torch.logsumexp(chunk, dim=-1, out=out_lse[start:stop])
                out_entropy[start:stop] = 0.0
                if temperatures:
                    chunk.sub_(top)  # as reduce_chunk leaves it
            if temperatures:
                tempered_logsumexps(
                    chunk, top, temperatures, [out[start:stop] for out in out_tempered]
                )
        host = to_host((out_ids, out_values, out_lse, out_entropy, *out_tempered))
        return TopK(*host[:4], logsumexp_t=dict(zip(temperatures, host[4:])))


def reduce_chunk(logits: torch.Tensor, top: torch.Tensor, lse_out, entropy_out) -> None:
    """logsumexp and the exact entropy of each row, in place on ``logits`` (float32).

    One exp pass serves both: with y = x - max, s = sum(e^y), logsumexp = max + log s
    and entropy = log s - sum(e^y * y) / s. A row with masked (-inf) logits makes
    0 * -inf = nan there; only such rows are summed again with those terms as 0.
    """
    shifted = logits.sub_(top)
    exp = torch.exp(shifted)
    total = exp.sum(dim=-1)
    dot = torch.linalg.vecdot(exp, shifted)
    bad = torch.isnan(dot)
    if bad.any():
        rows = bad.nonzero().squeeze(1)
        dot[rows] = (exp[rows] * shifted[rows]).nan_to_num(0.0).sum(dim=-1)
    del exp
    log_total = torch.log(total)
    torch.add(top.squeeze(1), log_total, out=lse_out)
    torch.sub(log_total, dot / total, out=entropy_out)


def tempered_logsumexps(shifted: torch.Tensor, top: torch.Tensor, temperatures, outs) -> None:
    """logsumexp(x / T) of each row for each T, from ``shifted`` = x - max (float32).

    With y = x - max <= 0: logsumexp(x / T) = max / T + log sum(e^(y / T)); the sum is
    at least 1 (the top logit's term), so it neither overflows nor underflows whatever
    T is. One scratch buffer of the chunk's size serves every T, so the peak memory is
    the entropy pass's (``reduce_chunk`` frees its own exp buffer before this runs).
    """
    scratch = torch.empty_like(shifted)
    top = top.squeeze(1)
    for temperature, out in zip(temperatures, outs):
        torch.div(shifted, temperature, out=scratch)
        scratch.exp_()
        torch.add(top / temperature, torch.log(scratch.sum(dim=-1)), out=out)


def to_host(tensors):
    """Copy to host memory: on CUDA into pinned buffers without blocking, then one sync."""
    if not tensors[0].is_cuda:
        return tensors
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(host, tensors):
        dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host
