"""Statistics of a shard's rows for the manifest and the report, fed by validation.

Validation reads every row once; it hands each checked block to a ``ShardStats``
so the report's histograms cost no second pass. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MASS_BINS = np.linspace(0.0, 1.0, 21)
ENTROPY_NUM_BINS = 40


def entropy_bins(vocab_size: int) -> np.ndarray:
    """Histogram edges in nats: 0 up to ln(vocab), the entropy of a uniform distribution."""
    return np.linspace(0.0, float(np.log(max(vocab_size, 2))), ENTROPY_NUM_BINS + 1)


@dataclass
class ShardStats:
    """Top-k mass, entropy and next-token hits, summed block by block."""

    vocab_size: int
    with_entropy: bool
    topk_mass_sum: float = 0.0
    topk_mass_hist: np.ndarray = field(init=False)
    entropy_sum: float = 0.0
    entropy_hist: np.ndarray = field(init=False)
    next_token_in_topk: int = 0
    next_token_rows: int = 0

    def __post_init__(self) -> None:
        self.topk_mass_hist = np.zeros(len(MASS_BINS) - 1, dtype=np.int64)
        bins = ENTROPY_NUM_BINS if self.with_entropy else 0  # edges: entropy_bins
        self.entropy_hist = np.zeros(bins, dtype=np.int64)

    def add(self, ids, logits, logsumexp, entropy, next_ids, has_next) -> None:
        """One block of checked rows: rank-free ids [n, k], float32 logits, their logsumexp,
        entropy (or None), the true next token of each row and whether it has one."""
        mass = np.exp(logits - logsumexp[:, None]).sum(axis=1)
        self.topk_mass_sum += float(mass.sum())
        self.topk_mass_hist += np.histogram(np.clip(mass, 0.0, 1.0), bins=MASS_BINS)[0]
        if entropy is not None:
            self.entropy_sum += float(entropy.sum())
            edges = entropy_bins(self.vocab_size)
            # float16 rounding can step just past ln(vocab): clip into the last bin.
            self.entropy_hist += np.histogram(np.clip(entropy, 0.0, edges[-1]), bins=edges)[0]
        self.next_token_in_topk += int(((ids == next_ids[:, None]).any(axis=1) & has_next).sum())
        self.next_token_rows += int(has_next.sum())
