"""The pipeline engine: the teacher in one process, its layers spread over the
group's GPUs by ``device_map="auto"`` (or on the CPU), reduced to top-k rows.

Knows nothing of files or Snakemake. The full ``[tokens, vocab]`` logits are never
materialised in float32: rows go through the output head in chunks (``topk``).
"""

from __future__ import annotations

import logging

import torch

from ..errors import TeacherError
from .topk import Reduction, TopK, draw_uniforms, reduce_rows

log = logging.getLogger(__name__)

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "auto": "auto",
}

# float32 bytes one top-k chunk may hold: rows x vocab x 4 <= this.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


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

    kwargs = from_pretrained_options(dtype, attn_implementation, trust_remote_code)
    kwargs["device_map"] = "auto" if on_gpu else "cpu"
    if max_memory:
        kwargs["max_memory"] = max_memory
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    if on_gpu:
        refuse_offload(
            getattr(model, "hf_device_map", None), model.get_memory_footprint(), allow_offload
        )
    return model


def from_pretrained_options(dtype: str, attn_implementation, trust_remote_code: bool) -> dict:
    """What every engine passes ``from_pretrained`` from the ``teacher`` settings."""
    options = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    return options


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


class TopKHead:
    """The pipeline engine: runs the body once and the output head in row chunks.

    The chunked head is used only when it reproduces ``model(...).logits`` bit for
    bit on a probe batch; architectures that change logits after ``lm_head`` (final
    soft-capping, logit scaling) fall back to the model's own forward, still reduced
    to top-k in chunks. No forward builds a KV cache: nothing reads it.
    """

    def __init__(
        self,
        model,
        top_k: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        with_entropy: bool = True,
        temperatures=(1.0,),
        sampling=None,
    ):
        self.model = model
        self.top_k = top_k
        self.description = "pipeline"
        self.head = model.get_output_embeddings()
        self.body = model.base_model
        self.input_device = model.get_input_embeddings().weight.device
        vocab = self.head.weight.shape[0] if self.head is not None else model.config.vocab_size
        # The entropy costs one more pass over each logits chunk (~13% of lm_head + top-k);
        # each extra temperature one exp pass more, no more memory than the entropy's.
        self.reduction = Reduction.of(
            top_k, vocab, chunk_bytes, with_entropy, temperatures, sampling
        )
        self.chunked = self.head is not None and self._chunked_head_matches()
        log.info(
            "top-k via %s, %d rows per chunk",
            "chunked output head"
            if self.chunked
            else "the model's own forward (head not chunkable)",
            self.chunk_rows,
        )

    @property
    def chunk_rows(self) -> int:
        return self.reduction.chunk_rows

    @property
    def extra_temperatures(self) -> tuple[float, ...]:
        return self.reduction.temperatures

    @property
    def pad_id(self) -> int:
        """Padded positions are masked out and never stored, so any valid id pads."""
        return int(self.model.config.pad_token_id or 0)

    @torch.inference_mode()
    def _chunked_head_matches(self) -> bool:
        vocab = int(self.model.config.vocab_size)
        ids = (torch.arange(8, device=self.input_device) * 7919 % vocab).unsqueeze(0)
        mask = torch.ones_like(ids)
        try:
            full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False)
            projected = self.head(hidden.last_hidden_state.to(self.head.weight.device))
            return torch.equal(full, projected)
        except Exception as exc:  # any mismatch in structure means: do not chunk
            log.info("chunked head probe failed (%s); using the model's forward", exc)
            return False

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_keys=None, targets=None
    ) -> TopK:
        """``row_keys`` (``sampling.row_keys`` of the valid positions, row-major) seed the
        draws when the reduction samples; ``targets`` (their next token ids, -1: none) give
        ``TopK.target_logit``."""
        uniforms = draw_uniforms(self.reduction.samples, row_keys)
        input_ids = input_ids.to(self.input_device)
        attention_mask = attention_mask.to(self.input_device)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if self.chunked:
            hidden = self.body(**inputs).last_hidden_state
            rows = hidden[attention_mask.to(hidden.device).bool()]
            device = self.head.weight.device
            return reduce_rows(
                rows, self.head, self.reduction, device, uniforms=uniforms, targets=targets
            )
        logits = self.model(**inputs).logits
        rows = logits[attention_mask.to(logits.device).bool()]
        return reduce_rows(
            rows, None, self.reduction, rows.device, uniforms=uniforms, targets=targets
        )

    def close(self) -> None:
        """Nothing to stop: the weights go with the process."""
