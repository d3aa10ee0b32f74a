"""Inside a tensor-parallel rank: the sharded teacher, reduced over this rank's slice
of the vocabulary.

transformers' tensor-parallel plan splits every layer across the ranks and gathers
the output head's logits onto each of them. The gather is skipped here: each rank
multiplies the (replicated) last hidden state by its own rows of the head, so the
full ``[tokens, vocab]`` logits exist nowhere, and reduces them to top-k, partial
logsumexp and entropy (``topk.reduce_rows``); the job merges the slices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .teacher import DEFAULT_CHUNK_BYTES, from_pretrained_options
from .topk import Reduction, TopK, reduce_rows


def load_sharded_teacher(teacher, world_size: int):
    """The teacher loaded with its tensor-parallel plan across ``world_size`` ranks."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = from_pretrained_options(
        teacher.dtype, teacher.attn_implementation, teacher.trust_remote_code
    )
    kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=world_size)
    model = AutoModelForCausalLM.from_pretrained(str(teacher.path), **kwargs)
    model.eval()
    return model


def local_part(tensor):
    """This rank's part of a DTensor (all of it when replicated); a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class VocabSliceHead:
    """The sharded teacher, reduced to top-k rows over vocabulary ids
    ``[first_id, first_id + slice_size)``.

    The slice is multiplied here only when that reproduces the model's own logits bit
    for bit on a probe batch, on every rank (the choice must be the same on all of
    them: the two paths run different collectives). Otherwise each rank runs the
    model's forward and reduces its slice of the gathered logits.
    """

    def __init__(self, model, setup):
        self.model = model
        self.top_k = setup.top_k
        rank, world = setup.rank, setup.world_size
        head = model.get_output_embeddings()
        weight = local_part(head.weight.data)
        bias = local_part(head.bias.data) if getattr(head, "bias", None) is not None else None
        vocab = int(head.weight.shape[0])
        if weight.shape[0] == vocab:  # replicated: take this rank's rows as a Shard(0) would
            size = -(-vocab // world)
            mine = slice(min(rank * size, vocab), min((rank + 1) * size, vocab))
            weight = weight[mine]
            bias = bias[mine] if bias is not None else None
        sizes = [0] * world
        dist.all_gather_object(sizes, int(weight.shape[0]))
        self.first_id, self.slice_size = sum(sizes[:rank]), sizes[rank]
        if sum(sizes) != vocab:
            raise RuntimeError(f"vocabulary slices {sizes} do not add up to {vocab} rows")
        self.weight, self.bias = weight, bias
        self.device = weight.device
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        # At least top_k ids per slice: tensor_plan checked that before the ranks started.
        self.reduction = Reduction.of(
            setup.top_k,
            self.slice_size,
            DEFAULT_CHUNK_BYTES,
            setup.with_entropy,
            setup.temperatures,
            setup.sampling,
        )
        # On the rank's device: NCCL reduces CUDA tensors only.
        matches = torch.tensor([int(self._slice_matches_model())], device=self.device)
        dist.all_reduce(matches, op=dist.ReduceOp.MIN)
        self.sliced = bool(matches.item())

    def describe(self) -> str:
        how = "its rows of the output head" if self.sliced else "its slice of the model's logits"
        return f"ids {self.first_id}..{self.first_id + self.slice_size - 1} via {how}"

    @property
    def pad_id(self) -> int:
        return int(self.model.config.pad_token_id or 0)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap:  # as Gemma 2's forward does it, op for op
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def _inputs(self, input_ids, attention_mask) -> dict:
        return dict(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        )

    @torch.inference_mode()
    def _slice_matches_model(self) -> bool:
        vocab = int(self.model.config.get_text_config().vocab_size)
        ids = (torch.arange(8) * 7919 % vocab).unsqueeze(0)
        inputs = self._inputs(ids, torch.ones_like(ids))
        full = local_part(self.model(**inputs).logits)
        hidden = local_part(self.model.base_model(**inputs).last_hidden_state)
        if full.shape[-1] < self.first_id + self.slice_size:
            return False
        mine = full[..., self.first_id : self.first_id + self.slice_size]
        return torch.equal(mine, self.project(hidden))

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, uniforms=None, targets=None
    ) -> TopK:
        inputs = self._inputs(input_ids, attention_mask)
        keep = inputs["attention_mask"].bool()
        if self.sliced:
            hidden = local_part(self.model.base_model(**inputs).last_hidden_state)
            return reduce_rows(
                hidden[keep],
                self.project,
                self.reduction,
                self.device,
                id_offset=self.first_id,
                uniforms=uniforms,
                targets=targets,
            )
        logits = local_part(self.model(**inputs).logits)
        rows = logits[keep][:, self.first_id : self.first_id + self.slice_size]
        return reduce_rows(
            rows,
            None,
            self.reduction,
            self.device,
            id_offset=self.first_id,
            uniforms=uniforms,
            targets=targets,
        )
