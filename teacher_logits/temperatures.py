"""``generation.temperatures``: which temperatures a run stores a logsumexp for.

Plain Python, so the plan-time check (``rules/common.smk``) and the fingerprint
(``config.meaning_settings``) spell the list the way the jobs, the shards and the
reader do: sorted, each once, 1.0 always (temperature 1 is ``logsumexp`` itself).
"""

from __future__ import annotations

import math

from .errors import ConfigError

DEFAULT_TEMPERATURES = (1.0,)
# Below this, logits / T leave the range the stored float32 logsumexp can hold for some
# vocabularies' logits, and no distillation setup uses such a temperature anyway.
MIN_TEMPERATURE = 1e-3
EXAMPLE = "e.g. temperatures: [0.5, 1.0, 2.0]"


def normalise_temperatures(values) -> tuple[float, ...]:
    """Sorted floats, each once, 1.0 included whether listed or not."""
    return tuple(sorted({float(v) for v in values or ()} | set(DEFAULT_TEMPERATURES)))


def check_temperatures(config: dict) -> None:
    """A temperature at or below 0 (or not finite) or one listed twice, as one line."""
    listed = config["generation"].get("temperatures") or []
    seen: set[float] = set()
    for value in listed:
        temperature = float(value)
        if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
            raise ConfigError(
                f"generation.temperatures: {value!r} is not a temperature of at least "
                f"{MIN_TEMPERATURE} (a logsumexp of logits / T needs a finite T > 0); list only "
                f"such numbers, {EXAMPLE}"
            )
        if temperature in seen:
            raise ConfigError(
                f"generation.temperatures lists {temperature!r} more than once; list each "
                f"temperature once (1.0 is always stored, listed or not), {EXAMPLE}"
            )
        seen.add(temperature)


def planned_temperatures(settings: dict) -> tuple[float, ...]:
    """The temperatures of a run from its meaning settings (``plan.json``'s and
    ``manifest.json``'s ``settings``): they name them only when they are not the default.
    The sampled modes store the sample temperature's too."""
    generation = (settings or {}).get("generation", {})
    listed = list(generation.get("temperatures") or [])
    if generation.get("mode", "topk") != "topk":
        listed.append(generation.get("sample_temperature", 1.0))
    return normalise_temperatures(listed)
