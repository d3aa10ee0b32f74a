"""Rows of logits -> per-token top-k, logsumexp, entropy and tempered logsumexps.

Both engines reduce with these functions: the pipeline engine over the whole
vocabulary, each tensor-parallel rank over its own slice of it, after which
``merge_slices`` combines the slices exactly as one pass over the whole
vocabulary would (up to float32 rounding). Rows go through the output head in
chunks, so the memory of the step is bounded by a chunk, not by
tokens x vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..store.format import extra_temperatures


@dataclass
class TopK:
    """Results for the valid (unpadded) positions of a batch, row-major by sample."""

    ids: torch.Tensor  # int32 [N, k]
    logits: torch.Tensor  # float32 [N, k], most likely first
    logsumexp: torch.Tensor  # float32 [N]
    entropy: torch.Tensor  # float32 [N]
    # Temperature T (other than 1) -> float32 [N] logsumexp(logits / T).
    logsumexp_t: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Reduction:
    """What each row is reduced to, and how many rows one chunk of logits may hold."""

    top_k: int
    chunk_rows: int
    with_entropy: bool = True
    # Temperatures other than 1, each one exp pass more over each chunk.
    temperatures: tuple[float, ...] = ()

    @classmethod
    def of(cls, top_k, vocab, chunk_bytes, with_entropy=True, temperatures=(1.0,)):
        """``chunk_bytes`` of float32 logits per chunk over a vocabulary (slice) of ``vocab``."""
        return cls(
            top_k=top_k,
            chunk_rows=max(1, chunk_bytes // (int(vocab) * 4)),
            with_entropy=with_entropy,
            temperatures=tuple(extra_temperatures(temperatures)),
        )


def reduce_rows(rows: torch.Tensor, project, reduction: Reduction, device, id_offset=0) -> TopK:
    """Reduce ``rows`` (hidden states when ``project`` is the output head, else logits,
    which are overwritten) chunk by chunk; ids are shifted by ``id_offset`` (a
    vocabulary slice's first id)."""
    n, k = rows.shape[0], reduction.top_k
    out_ids = torch.empty((n, k), dtype=torch.int32, device=device)
    out_values = torch.empty((n, k), dtype=torch.float32, device=device)
    out_lse = torch.empty(n, dtype=torch.float32, device=device)
    out_entropy = torch.empty(n, dtype=torch.float32, device=device)
    temperatures = reduction.temperatures
    out_tempered = [torch.empty(n, dtype=torch.float32, device=device) for _ in temperatures]
    for start in range(0, n, reduction.chunk_rows):
        stop = min(n, start + reduction.chunk_rows)
        chunk = rows[start:stop]
        if project is not None:
            chunk = project(chunk.to(device))
        chunk = chunk.float()
        values, ids = torch.topk(chunk, k, dim=-1, sorted=True)
        out_values[start:stop] = values
        out_ids[start:stop] = ids + id_offset
        top = values[:, :1]
        if reduction.with_entropy:
            reduce_chunk(chunk, top, out_lse[start:stop], out_entropy[start:stop])
        else:
            torch.logsumexp(chunk, dim=-1, out=out_lse[start:stop])
            out_entropy[start:stop] = 0.0
            if temperatures:
                chunk.sub_(top)  # as reduce_chunk leaves it
        if temperatures:
            tempered_logsumexps(chunk, top, temperatures, [out[start:stop] for out in out_tempered])
    host = to_host((out_ids, out_values, out_lse, out_entropy, *out_tempered))
    return TopK(*host[:4], logsumexp_t=dict(zip(temperatures, host[4:])))


def merge_slices(slices: list[TopK], top_k: int, with_entropy: bool = True) -> TopK:
    """One row's results over the whole vocabulary from its results over disjoint slices.

    logsumexp is the logsumexp of the slices' logsumexps. With w_r = exp(lse_r - lse),
    the share of probability in slice r, the entropy is sum_r w_r H_r - sum_r w_r log w_r
    (the chain rule of entropy), which needs no difference of large numbers. Top-k is the
    top-k of the slices' top-k lists.
    """
    if len(slices) == 1:
        return slices[0]
    # A slice whose logits are all masked (-inf) holds no probability; its own reduction
    # is NaN there (-inf - -inf), so it is taken out here rather than checked per chunk
    # on the device (a host sync per chunk).
    empty = torch.stack([s.logits[:, 0] for s in slices]) == -torch.inf
    lse_r = torch.stack([s.logsumexp for s in slices]).masked_fill(empty, -torch.inf)
    lse = torch.logsumexp(lse_r, dim=0)
    if with_entropy:
        weight = torch.exp(lse_r - lse)
        surprise = torch.where(weight > 0, -torch.log(weight), torch.zeros_like(weight))
        entropy_r = torch.stack([s.entropy for s in slices]).masked_fill(empty, 0.0)
        entropy = (weight * (entropy_r + surprise)).sum(dim=0)
    else:
        entropy = torch.zeros_like(lse)
    values, order = torch.topk(torch.cat([s.logits for s in slices], dim=1), top_k, dim=1)
    ids = torch.gather(torch.cat([s.ids for s in slices], dim=1), 1, order)
    tempered = {
        t: torch.logsumexp(
            torch.stack([s.logsumexp_t[t] for s in slices]).masked_fill(empty, -torch.inf), dim=0
        )
        for t in slices[0].logsumexp_t
    }
    return TopK(ids, values, lse, entropy, logsumexp_t=tempered)


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
