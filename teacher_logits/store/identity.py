"""Which run made a shard: its identity attributes, and how shards that disagree on
them are named in one sentence (gather, ``verify --deep`` and ``status`` say it alike)."""

from __future__ import annotations

from ..temperatures import normalise_temperatures
from .format import stored_temperatures

# The attributes that say which run made a shard, in the order a difference is
# explained (a new teacher changes the config fingerprint too), and what it means.
FINGERPRINTS = {
    "teacher_fingerprint": "made by different teachers",
    "tokenizer_fingerprint": "made with different tokenizers",
    "teacher_content_digest": "made by different teacher weights",
    "config_fingerprint": (
        "made with different settings that change the stored numbers (top_k, max_length, "
        "dtypes, temperatures, chat or overflow settings)"
    ),
}


def identity_mismatch(attrs: dict, expected: dict) -> list[str]:
    """How ``attrs`` differ from ``expected`` (empty: the shard this run planned there)."""
    return [
        f"attribute {key}={attrs.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if attrs.get(key) != value
    ]


def temperature_mismatch(attrs: dict, expected) -> list[str]:
    """How the temperatures a shard stores a logsumexp for differ from the run's (empty: the
    same). A run with other temperatures has another config fingerprint too; this says why."""
    found, want = stored_temperatures(attrs), normalise_temperatures(expected)
    if found == want:
        return []
    return [
        f"logsumexp at temperatures {list(found)}, expected {list(want)} "
        "(generation.temperatures differs)"
    ]


def fingerprint_conflicts(found: dict[int, dict], reference: dict, reference_name: str) -> list:
    """One sentence per fingerprint on which shards disagree with ``reference`` (and so
    with each other), naming the shards on each side: ``found`` maps a shard index to its
    attributes. Each shard is explained under the first fingerprint it differs on."""
    sentences, explained = [], set()
    for key, meaning in FINGERPRINTS.items():
        if key not in reference:
            continue
        odd: dict = {}
        for index in sorted(found):
            value = found[index].get(key)
            if value != reference[key] and index not in explained:
                odd.setdefault(value, []).append(index)
        if not odd:
            continue
        agree = [i for i in sorted(found) if found[i].get(key) == reference[key]]
        ours = (
            f"{shard_list(agree)} and {reference_name} have" if agree else f"{reference_name} has"
        )
        theirs = ", ".join(
            f"{shard_list(ids)} {'has' if len(ids) == 1 else 'have'} {_short(value)}"
            for value, ids in odd.items()
        )
        sentences.append(f"{ours} {key} {_short(reference[key])}, {theirs}: they were {meaning}")
        explained.update(i for ids in odd.values() for i in ids)
    return sentences


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 15 else text


def shard_list(indexes, limit: int = 8) -> str:
    """``[0, 1, 2, 3, 5]`` -> ``shards 0-3, 5``: runs of consecutive shards as ranges."""
    indexes = sorted(indexes)
    runs: list[list[int]] = []
    for i in indexes:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        text += f", ... ({len(indexes)} in all)"
    return f"{'shard' if len(indexes) == 1 else 'shards'} {text}"


# --- a reader's pin on the shards its index describes -------------------------------------
#
# index.h5's dataset of each shard's ``finished_at`` attribute, by shard number (indexes
# gathered before it have none). Its job writes ``finished_at`` when it commits the shard,
# so a regenerated shard always has another: content attributes, not the file's inode or
# mtime, which a store copied whole (``cp -r``) changes and a regenerate may not.
SHARD_FINISHED_AT = "shard_finished_at"
# The shard attributes a reader compares with its index on every open.
PINNED_ATTRS = ("shard_index", "top_k", "config_fingerprint", "finished_at")


def pin_mismatch(found: dict, pinned: dict) -> str:
    """How an opened shard (``found``: its ``PINNED_ATTRS`` and ``num_samples``) differs
    from what the reader's index says of it (``pinned``); empty: the shard it indexed."""
    return "; ".join(
        f"{key} {found.get(key)!r}, the index says {value!r}"
        for key, value in pinned.items()
        if found.get(key) != value
    )
