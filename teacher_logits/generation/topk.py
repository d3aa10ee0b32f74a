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

from ..sampling import CHOICE_STREAM, DRAW_STREAM
from ..sampling import uniforms as hashed_uniforms
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
    # Sampled modes: int32 [N, samples] ids drawn at the sample temperature (from outside
    # the top-k in topk+sampled), and float32 [N] the logsumexp at that temperature of
    # what they were drawn from (-inf: nothing there, the row's draws are void).
    draws: torch.Tensor | None = None
    tail_lse: torch.Tensor | None = None
    # float32 [N]: the logit of each row's target id (the actual next token), -inf where
    # there is none or (a vocabulary slice) it is another slice's; None: no targets given.
    target_logit: torch.Tensor | None = None


@dataclass(frozen=True)
class Reduction:
    """What each row is reduced to, and how many rows one chunk of logits may hold."""

    top_k: int
    chunk_rows: int
    with_entropy: bool = True
    # Temperatures other than 1, each one exp pass more over each chunk.
    temperatures: tuple[float, ...] = ()
    # Draws per row (0: none), their temperature, and whether they skip the top-k.
    samples: int = 0
    sample_temperature: float = 1.0
    tail_only: bool = False

    @classmethod
    def of(cls, top_k, vocab, chunk_bytes, with_entropy=True, temperatures=(1.0,), sampling=None):
        """``chunk_bytes`` of float32 logits per chunk over a vocabulary (slice) of ``vocab``;
        ``sampling``: a ``SampleSettings`` (None: no draws)."""
        return cls(
            top_k=top_k,
            chunk_rows=max(1, chunk_bytes // (int(vocab) * 4)),
            with_entropy=with_entropy,
            temperatures=tuple(extra_temperatures(temperatures)),
            samples=sampling.draws if sampling is not None else 0,
            sample_temperature=sampling.temperature if sampling is not None else 1.0,
            tail_only=bool(sampling is not None and sampling.tail_only),
        )


def reduce_rows(
    rows: torch.Tensor,
    project,
    reduction: Reduction,
    device,
    id_offset=0,
    uniforms=None,
    targets=None,
) -> TopK:
    """Reduce ``rows`` (hidden states when ``project`` is the output head, else logits,
    which are overwritten) chunk by chunk; ids are shifted by ``id_offset`` (a
    vocabulary slice's first id). ``uniforms`` (float32 [rows, samples], see
    ``sampling.uniforms``) drive the draws when the reduction samples. ``targets`` (int64
    [rows], -1: none): each row's next token, whose logit is picked from the same chunk
    (``TopK.target_logit``)."""
    n, k = rows.shape[0], reduction.top_k
    sampling = reduction.samples > 0
    if sampling:
        out_draws = torch.empty((n, reduction.samples), dtype=torch.int32, device=device)
        out_tail = torch.empty(n, dtype=torch.float32, device=device)
        uniforms = torch.as_tensor(uniforms).to(device)
    out_ids = torch.empty((n, k), dtype=torch.int32, device=device)
    out_values = torch.empty((n, k), dtype=torch.float32, device=device)
    out_lse = torch.empty(n, dtype=torch.float32, device=device)
    out_entropy = torch.empty(n, dtype=torch.float32, device=device)
    temperatures = reduction.temperatures
    out_tempered = [torch.empty(n, dtype=torch.float32, device=device) for _ in temperatures]
    if targets is not None:
        # Ids in this slice's own numbering; another slice's (or none) picks nothing.
        local = torch.as_tensor(targets, dtype=torch.long).to(device) - id_offset
        out_target = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)
    for start in range(0, n, reduction.chunk_rows):
        stop = min(n, start + reduction.chunk_rows)
        chunk = rows[start:stop]
        if project is not None:
            chunk = project(chunk.to(device))
        chunk = chunk.float()
        if targets is not None:  # before the reductions below shift the chunk in place
            pick_target(chunk, local[start:stop], out_target[start:stop])
        values, ids = torch.topk(chunk, k, dim=-1, sorted=True)
        out_values[start:stop] = values
        out_ids[start:stop] = ids + id_offset
        top = values[:, :1] if k else chunk.amax(dim=-1, keepdim=True)
        if reduction.with_entropy:
            reduce_chunk(chunk, top, out_lse[start:stop], out_entropy[start:stop])
        else:
            torch.logsumexp(chunk, dim=-1, out=out_lse[start:stop])
            out_entropy[start:stop] = 0.0
            if temperatures or sampling:
                chunk.sub_(top)  # as reduce_chunk leaves it
        if temperatures:
            tempered_logsumexps(chunk, top, temperatures, [out[start:stop] for out in out_tempered])
        if sampling:
            out_draws[start:stop], out_tail[start:stop] = draw_chunk(
                chunk, top, ids if reduction.tail_only else None, reduction, uniforms[start:stop]
            )
            out_draws[start:stop] += id_offset
    tensors = (out_ids, out_values, out_lse, out_entropy, *out_tempered)
    if sampling:
        tensors += (out_draws, out_tail)
    if targets is not None:
        tensors += (out_target,)
    host = list(to_host(tensors))
    extra = dict(target_logit=host.pop()) if targets is not None else {}
    if sampling:
        extra.update(draws=host[-2], tail_lse=host[-1])
    return TopK(
        *host[:4], logsumexp_t=dict(zip(temperatures, host[4 : 4 + len(temperatures)])), **extra
    )


def pick_target(chunk: torch.Tensor, local: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = chunk[i, local[i]]`` where ``local[i]`` is a column of the chunk."""
    inside = (local >= 0) & (local < chunk.shape[1])
    picked = chunk.gather(1, local.clamp(0, chunk.shape[1] - 1).unsqueeze(1)).squeeze(1)
    torch.where(inside, picked, out, out=out)


def draw_uniforms(samples: int, row_keys, stream: int = DRAW_STREAM):
    """float32 [rows, samples] uniforms of the rows with these keys (None: no draws)."""
    if not samples:
        return None
    if row_keys is None:
        raise ValueError("sampled rows need their keys (sampling.row_keys)")
    return torch.from_numpy(hashed_uniforms(row_keys, samples, stream))


def choice_uniforms(samples: int, row_keys):
    """The second stream, which ``merge_draws`` picks a slice's piece with."""
    return draw_uniforms(samples, row_keys, CHOICE_STREAM)


def draw_chunk(shifted, top, exclude, reduction: Reduction, uniforms):
    """Draws by inverse CDF from each row's softmax at the sample temperature.

    ``shifted`` = logits - row max (float32, not modified); ``exclude`` [c, k]: ids
    (within the chunk) to leave out, the top-k in topk+sampled. Returns the draws
    int32 [c, samples] and the logsumexp at that temperature of what they come from.
    The CDF is float32: an id whose share is below ~1e-7 of the row's is not drawn
    in proportion (far below what any student can learn from).
    """
    temperature = reduction.sample_temperature
    cdf = torch.div(shifted, temperature).exp_()
    excluding = exclude is not None and exclude.shape[1] > 0
    if excluding:
        cdf.scatter_(1, exclude, 0.0)
    # One row's scan may take another kernel (CUDA scans a single row as a whole
    # tensor): scanning at least two rows keeps every row's rounding the same.
    single = cdf.shape[0] == 1
    if single:
        cdf = torch.cat([cdf, cdf])
    cdf = cdf.cumsum_(dim=1)[:1] if single else cdf.cumsum_(dim=1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: the largest float below it is still
    # inside the last id with any mass.
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    draws = torch.searchsorted(cdf, target.contiguous(), right=True)
    draws.clamp_(max=cdf.shape[1] - 1)
    if excluding:
        # A parallel scan may leave an excluded id (mass 0) a rounding-sized step of the
        # CDF; a draw landing there (~1e-7 per draw) moves on to the next id that has mass.
        hit = (draws.unsqueeze(2) == exclude.unsqueeze(1)).any(dim=2)
        onward = torch.searchsorted(cdf, cdf.gather(1, draws), right=True)
        draws = torch.where(hit, onward.clamp_(max=cdf.shape[1] - 1), draws)
    tail_lse = top.squeeze(1) / temperature + torch.log(total.squeeze(1))
    return draws.to(torch.int32), tail_lse


def merge_slices(
    slices: list[TopK], top_k: int, with_entropy: bool = True, choices=None, sample_temperature=1.0
) -> TopK:
    """One row's results over the whole vocabulary from its results over disjoint slices.

    logsumexp is the logsumexp of the slices' logsumexps. With w_r = exp(lse_r - lse),
    the share of probability in slice r, the entropy is sum_r w_r H_r - sum_r w_r log w_r
    (the chain rule of entropy), which needs no difference of large numbers. Top-k is the
    top-k of the slices' top-k lists. Draws: see ``merge_draws`` (``choices``: float32
    [N, samples] uniforms of ``sampling.CHOICE_STREAM``).
    """
    if len(slices) == 1:
        return slices[0]
    # A slice whose logits are all masked (-inf) holds no probability; its own reduction
    # is NaN (or -inf) there, so it is taken out here rather than checked per chunk on
    # the device (a host sync per chunk).
    lse_r = torch.stack([s.logsumexp for s in slices])
    empty = torch.isnan(lse_r) | torch.isneginf(lse_r)
    lse_r = lse_r.masked_fill(empty, -torch.inf)
    lse = torch.logsumexp(lse_r, dim=0)
    if with_entropy:
        weight = torch.exp(lse_r - lse)
        surprise = torch.where(weight > 0, -torch.log(weight), torch.zeros_like(weight))
        entropy_r = torch.stack([s.entropy for s in slices]).masked_fill(empty, 0.0)
        entropy = (weight * (entropy_r + surprise)).sum(dim=0)
    else:
        entropy = torch.zeros_like(lse)
    all_values = torch.cat([s.logits for s in slices], dim=1)
    all_ids = torch.cat([s.ids for s in slices], dim=1)
    values, order = torch.topk(all_values, top_k, dim=1)
    ids = torch.gather(all_ids, 1, order)
    tempered = {
        t: torch.logsumexp(
            torch.stack([s.logsumexp_t[t] for s in slices]).masked_fill(empty, -torch.inf), dim=0
        )
        for t in slices[0].logsumexp_t
    }
    merged = TopK(ids, values, lse, entropy, logsumexp_t=tempered)
    if slices[0].target_logit is not None:  # one slice holds each target id, the rest -inf
        merged.target_logit = torch.stack([s.target_logit for s in slices]).amax(dim=0)
    if slices[0].draws is not None:
        merged.draws, merged.tail_lse = merge_draws(
            slices, all_values, all_ids, order, choices, sample_temperature
        )
    return merged


def merge_draws(slices, all_values, all_ids, kept, choices, temperature):
    """Draws over the whole vocabulary (or its tail outside the merged top-k) from each
    slice's draws over its own part.

    What a row's draws come from splits into disjoint pieces: each slice's own tail (its
    draws come from there, its ``tail_lse`` is that piece's mass) and the entries of the
    slices' top-k lists that the merged top-k did not keep (their logits are here).
    Draw j first picks a piece in proportion to its mass with ``choices[:, j]``, then
    takes the entry, or slice r's own draw j: exactly a draw from the union, as the
    slices' draws are independent of the pick.
    """
    discrete = all_values / temperature
    if discrete.shape[1]:
        discrete = discrete.scatter(1, kept, -torch.inf)
    lumps = torch.stack([s.tail_lse for s in slices], dim=1)
    lumps = torch.where(torch.isnan(lumps), -torch.inf, lumps)
    log_mass = torch.cat([discrete, lumps], dim=1)
    top = log_mass.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    cdf = (log_mass - top).exp_().cumsum_(dim=1)
    total = cdf[:, -1:]
    target = torch.minimum(choices * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=cdf.shape[1] - 1)
    m = discrete.shape[1]
    per_slice = torch.stack([s.draws for s in slices], dim=2)  # [N, samples, R]
    from_slice = per_slice.gather(2, (pick - m).clamp(min=0).unsqueeze(2)).squeeze(2)
    if m:
        from_list = all_ids.gather(1, pick.clamp(max=m - 1))
        draws = torch.where(pick < m, from_list, from_slice)
    else:
        draws = from_slice
    return draws.to(torch.int32), top.squeeze(1) + torch.log(total.squeeze(1))


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
