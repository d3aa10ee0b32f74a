"""Raw bytes of one stored row, from a run's settings: what the disk estimate starts
from before a shard is measured. No torch."""

from __future__ import annotations

from .sampling import planned_sampling
from .store.format import extra_temperatures
from .temperatures import DEFAULT_TEMPERATURES, planned_temperatures

VALUE_BYTES = {"float16": 2, "float32": 4, "int8": 1}
# The cross-tokenizer fields per token: its int32 byte span (8), its float32
# target_logprob (4), and its share of the text: about 4 UTF-8 bytes per token for a BPE
# vocabulary on English text (the demo's 2k vocabulary: 3.3).
TEXT_BYTES_PER_TOKEN = 4
CROSS_FIELD_BYTES = 8 + 4 + TEXT_BYTES_PER_TOKEN


def uncompressed_bytes_per_token(
    top_k: int,
    value_dtype: str,
    store_entropy: bool,
    temperatures=DEFAULT_TEMPERATURES,
    samples=0,
    cross_fields=False,
) -> int:
    """Raw bytes of one token row: input id, k ids, k logits (int8: and two float32 scales),
    logsumexp, entropy, one float32 logsumexp per temperature other than 1, an int32
    id and uint8 count per draw (the sampled modes), and the cross-tokenizer fields."""
    extra = 4 * len(extra_temperatures(temperatures)) + 5 * samples
    extra += CROSS_FIELD_BYTES if cross_fields else 0
    if top_k and value_dtype == "int8":
        extra += 8
    return 4 + top_k * (4 + VALUE_BYTES[value_dtype]) + 4 + (2 if store_entropy else 0) + extra


def part_bytes_per_token(
    top_k: int,
    value_dtype: str,
    store_entropy: bool,
    temperatures=DEFAULT_TEMPERATURES,
    samples=0,
    cross_fields=False,
) -> int:
    """Raw bytes of one row in a resume part: a shard's row without its input id (nor, of
    the cross-tokenizer fields, what prepare made: only target_logprob)."""
    row = uncompressed_bytes_per_token(top_k, value_dtype, store_entropy, temperatures, samples)
    return row - 4 + (4 if cross_fields else 0)


def planned_row(plan: dict) -> dict:
    """The temperatures and draws per row of a run's plan, as keyword arguments."""
    settings = plan.get("settings")
    return {
        "temperatures": planned_temperatures(settings),
        "samples": planned_sampling(settings)["samples"],
        # Plans from before the cross-tokenizer fields have none.
        "cross_fields": bool(plan.get("cross_tokenizer_fields", False)),
    }
