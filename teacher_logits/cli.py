"""The one command: ``teacher-logits info|status|verify|export|prune ...``.

Each subcommand is the ``main`` of its module, run with the rest of the command line
(``teacher-logits status X`` is ``python -m teacher_logits.status X``);
``python -m teacher_logits`` is the same command. Importing this imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

# name -> (module, one line of help), in the order ``--help`` lists them.
COMMANDS = {
    "info": ("info", "what a gathered store holds: teacher, tokenizer, sizes, modes, versions"),
    "status": ("status", "a run's shards: done, in progress, pending, failed; speed, ETA, disk"),
    "verify": (
        "verify",
        "check a (copied) store against its manifest's checksums; --deep reads all",
    ),
    "export": ("export", "write a store as Parquet for other trainers (--format parquet|axolotl)"),
    "prune": ("prune", "list (--yes: remove) shards and kept copies no plan owns any more"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="teacher-logits",
        description="Inspect and hand over teacher-logit stores. "
        "`teacher-logits COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, or the error naming the commands
        return 2
    # The rest goes to the command's own parser untouched (argparse would reorder it).
    command = import_module(f"{__package__}.{COMMANDS[argv[0]][0]}").main
    try:
        return command(argv[1:], prog=f"teacher-logits {argv[0]}")
    except BrokenPipeError:
        # The reader went away (`teacher-logits info X | head -1`): what it wanted was
        # printed. Point stdout at /dev/null so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
