"""Sampled teacher rows (``generation.mode``): settings, counter-based seeds, counts.

A draw's uniform number is a hash of (sample id, position in the sample, draw index)
and nothing else, so a row's draws depend only on its logits: a rerun, a resume, a
batch split or a different shard layout draws the same ids wherever the logits are
the same. The draws themselves (inverse CDF over the row's softmax) happen where the
logits are, in ``generation.topk``; this module needs numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("topk", "sampled", "topk+sampled")
# Counts are stored as uint8: at most this many draws per row.
MAX_SAMPLES = 255

# splitmix64 (Steele, Lea, Flood 2014): a fixed, well-mixed 64-bit hash, the same on
# every machine and numpy version.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# Two independent streams: the draw inside a slice of the vocabulary, and (tensor
# engine) which slice or kept entry a draw falls in.
DRAW_STREAM, CHOICE_STREAM = 0x5EED_D4A3, 0xC401_CE55


def sampled_stand_ins(settings: dict) -> dict:
    """Meaning settings as a ``sampled`` run fingerprints them: it stores no top-k, so the
    defaults stand in for the top-k size and value dtype, and changing either reruns
    nothing. Other modes' settings are returned as they are."""
    if (settings.get("generation") or {}).get("mode") != "sampled":
        return settings
    return {
        **settings,
        "generation": {**settings["generation"], "top_k": 64},
        "storage": {**(settings.get("storage") or {}), "value_dtype": "float16"},
    }


@dataclass(frozen=True)
class SampleSettings:
    """``generation.mode``, ``samples`` and ``sample_temperature``."""

    mode: str = "topk"
    samples: int = 16
    temperature: float = 1.0

    @classmethod
    def from_config(cls, generation: dict) -> SampleSettings:
        return cls(
            mode=generation.get("mode", "topk"),
            samples=int(generation.get("samples", 16)),
            temperature=float(generation.get("sample_temperature", 1.0)),
        )

    @property
    def draws(self) -> int:
        """Draws per row: 0 in ``topk`` mode."""
        return 0 if self.mode == "topk" else self.samples

    @property
    def tail_only(self) -> bool:
        """Draws come from outside the top-k (``topk+sampled``)."""
        return self.mode == "topk+sampled"

    def stored_top_k(self, top_k: int) -> int:
        """``sampled`` mode stores no top-k."""
        return 0 if self.mode == "sampled" else int(top_k)


def planned_sampling(settings: dict) -> dict:
    """``ShardExpectation``'s sampling fields from a run's meaning settings (``plan.json``'s
    or ``manifest.json``'s ``settings``, which name them only when not the default)."""
    generation = (settings or {}).get("generation", {})
    mode = generation.get("mode", "topk")
    return {
        "samples": 0 if mode == "topk" else int(generation.get("samples", 16)),
        "sample_mode": mode,
        "top_p": generation.get("top_p"),
    }


def check_sampling(config: dict) -> None:
    """Sampling settings that contradict each other, as one line with the fix (plan time)."""
    from .errors import ConfigError

    generation = config["generation"]
    if generation.get("top_p") is not None and generation.get("mode", "topk") != "topk":
        raise ConfigError(
            f"generation.top_p truncates the top-k, but generation.mode is "
            f"{generation['mode']!r}, whose draws already spread the mass past it; set "
            "top_p: null, or mode: topk"
        )


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of uint64 values (call under ``np.errstate(over="ignore")``)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_ids(ids) -> np.ndarray:
    """uint64: splitmix64 of each id, the same on every machine and numpy version
    (Python's hash() is salted per process)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(ids, dtype=np.int64).astype(np.uint64) + _GOLDEN)


def row_keys(sample_ids, offsets, position_base=None) -> np.ndarray:
    """uint64 [T]: one key per row from its sample id and its position in the sample.

    ``offsets`` [S+1] delimit the samples' rows; ``position_base`` [S] is the position
    of each sample's first row in its document (a window of a long document), default 0.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    base = np.zeros(len(lengths), np.int64) if position_base is None else position_base
    positions = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(
        offsets[:-1] - np.asarray(base, dtype=np.int64), lengths
    )
    with np.errstate(over="ignore"):
        ids = np.repeat(np.asarray(sample_ids, dtype=np.int64), lengths).astype(np.uint64)
        return mix64(mix64(ids + _GOLDEN) + positions.astype(np.uint64) * _GOLDEN)


def uniforms(keys: np.ndarray, draws: int, stream: int = DRAW_STREAM) -> np.ndarray:
    """float32 [N, draws] in [0, 1): draw j of the row with key k, from (k, j, stream) alone."""
    with np.errstate(over="ignore"):
        z = np.asarray(keys, dtype=np.uint64)[:, None] + np.uint64(stream) * _GOLDEN
        z = mix64(mix64(z) + (np.arange(draws, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    # 24 bits: every value is exact in float32 and below 1.
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def counts_from_draws(draws: np.ndarray, valid: np.ndarray | None = None):
    """Draws [N, S] -> (ids int32 [N, S], counts uint8 [N, S]): each row's distinct ids in
    ascending order with how often each was drawn, then unused slots (id 0, count 0).
    Rows not ``valid`` (a tail that underflowed) get all counts 0."""
    draws = np.sort(np.asarray(draws, dtype=np.int64), axis=1)
    n, s = draws.shape
    ids = np.zeros((n, s), np.int32)
    counts = np.zeros((n, s), np.uint8)
    if not n or not s:
        return ids, counts
    new = np.ones((n, s), bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = np.cumsum(new, axis=1) - 1  # each draw's distinct-id slot in its row
    rows = np.repeat(np.arange(n), s).reshape(n, s)
    ids[rows[new], slot[new]] = draws[new]
    counts = np.bincount((rows * s + slot).ravel(), minlength=n * s).astype(np.uint8)
    counts = counts.reshape(n, s)
    if valid is not None:
        ids[~valid] = 0
        counts[~valid] = 0
    return ids, counts
