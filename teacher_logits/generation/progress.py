"""Progress of a generate job as log lines: tokens done, tokens/s and ETA (tqdm)."""

from __future__ import annotations

import logging

log = logging.getLogger("generate")


class _LogStream:
    """A file-like object that turns tqdm's refreshes into log lines."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            log.info("%s", text)

    def flush(self) -> None:
        pass


def progress_bar(total_tokens: int, shard: int, initial: int = 0, every_s: float = 30.0):
    """A tqdm bar over tokens with tokens/s and ETA, as one log line every ``every_s``."""
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc=f"shard {shard}",
        file=_LogStream(),
        mininterval=every_s,
        ascii=True,
        ncols=100,
    )
