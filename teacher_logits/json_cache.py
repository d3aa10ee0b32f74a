"""The small JSON caches the workflow keeps beside a run: read with a shape check,
written atomically, never fatal.

A cache only saves work, so one that does not parse or has the wrong shape (a disk
that filled mid-write, a hand edit, a file from another version) is ignored with one
warning line, removed, and rebuilt by whoever writes it next; one that cannot be written (a
read-only or full disk) costs the next reader its shortcut, nothing more. Each caller
states the shape it relies on, entry by entry, so a damaged entry never reaches code
that indexes into it. Standard library only: this runs while Snakemake plans.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .layout import atomic_write_text, partial_path

log = logging.getLogger("teacher_logits.cache")


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object from ``path``; None when there is none, or it does not parse or is not
    an object (a record being replaced, or written by hand)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def has_fields(value, **types) -> bool:
    """Whether ``value`` is a dict whose ``name`` entries have these types."""
    return isinstance(value, dict) and all(
        isinstance(value.get(name), kind) for name, kind in types.items()
    )


def mapping_of(entry_ok: Callable[[str, object], bool]) -> Callable[[object], bool]:
    """A shape check for a dict whose every ``(key, value)`` passes ``entry_ok``."""

    def check(data) -> bool:
        return isinstance(data, dict) and all(entry_ok(key, value) for key, value in data.items())

    return check


def load_cache(path: str | os.PathLike | None, valid: Callable[[object], bool]):
    """What the cache at ``path`` holds, or None when there is none (no path, no file,
    unreadable) or it is damaged (then with one warning line naming it)."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
    else:
        if valid(data):
            return data
        why = "not the shape this version writes"
    log.warning("ignoring the damaged cache %s (%s); it is rebuilt", path, why)
    try:  # so that the next reader does not warn again before it is written anew
        Path(path).unlink()
    except OSError:
        pass
    return None


def save_cache(path: str | os.PathLike | None, data, default=None) -> bool:
    """Write the cache atomically (``default`` as in ``json.dumps``); False, with nothing
    left behind, when it cannot be written."""
    if path is None:
        return False
    path = Path(path)
    try:
        atomic_write_text(path, json.dumps(data, default=default))
        return True
    except OSError:
        try:
            partial_path(path).unlink(missing_ok=True)
        except OSError:
            pass  # never made (a read-only or missing folder), or not ours to remove
        return False
