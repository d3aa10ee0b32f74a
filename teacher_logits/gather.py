"""Gather: validate every shard, then write ``index.h5`` and ``manifest.json``.

Shards are checked and hashed in worker processes (``gather_checks``); a shard whose
file and expectations did not change since a previous gather checked it is taken from
the check cache (``output_dir/.gather_checks.json``) instead of being read again.

A shard that fails any check, or that another run made (its teacher, tokenizer or
config fingerprint differs from the plan's), stops the gather: the first line of the
error names the shards, one line per bad shard says why, and the last line is the
command that regenerates them; nothing already finished is touched. Snakemake deletes
gather's outputs before it reruns gather, so a failed re-gather leaves no store (never
a stale one): the error says so. A full disk is one line, found before validation
where it can be, and leaves no ``.partial`` file.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from .disk import disk_full_is_a_user_error, ensure_room, gather_bytes, write_text_guarded
from .errors import DiskFullError, ShardError, TeacherError
from .fingerprints import file_sha256
from .gather_checks import check_shards, planned_samples
from .gather_stats import loss_mask_counts, run_statistics, shard_entry
from .generation.parts import remove_parts_dirs
from .layout import RunLayout, partial_path
from .shard_plan import load_plan
from .store.format import FORMAT_VERSION, TEMPERATURES_ATTR
from .store.identity import SHARD_FINISHED_AT, fingerprint_conflicts, shard_list
from .store.writer import GuardedFile
from .temperatures import planned_temperatures
from .tokenizer_identity import copy_tokenizer_files

log = logging.getLogger("gather")

# Snakemake options that must not be repeated in the printed command.
_DROP_WITH_VALUE = {"--forcerun", "-R", "--until", "-U", "--omit-from", "-O"}
_DROP_FLAGS = {"-n", "--dry-run", "--dryrun", "-F", "--forceall", "-f", "--force"}

# What shards are compared with: the plan prepare wrote.
PLAN_NAME = RunLayout(".").plan.name
# Why a failed gather leaves no store, said in its error.
NO_STORE = (
    "no store is served until gather succeeds: Snakemake removed the previous index.h5 and "
    "manifest.json (if any) when this gather started, as it does before rerunning a job"
)


def _snakemake_argv() -> list[str] | None:
    """The command line of the ``snakemake`` process running this job, if it is local."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            status = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        args = [a.decode(errors="replace") for a in argv]
        if len(args) > 1 and Path(args[0]).name.startswith("python"):
            if args[1:3] == ["-m", "snakemake"]:
                args = ["snakemake", *args[3:]]
            elif Path(args[1]).name == "snakemake":  # the entry point, run through its #!
                args = args[1:]
        if args and Path(args[0]).name == "snakemake":
            on_path = shutil.which("snakemake")
            if on_path and Path(on_path).resolve() == Path(args[0]).resolve():
                args[0] = "snakemake"
            # A job that a cluster executor started runs under an inner snakemake.
            return None if "--target-jobs" in args or "--mode" in args else args
        pid = int(status.rsplit(")", 1)[1].split()[1])
    return None


def regenerate_hint(shard_paths: list[str]) -> str:
    """The user's own command with ``--forcerun`` for the bad shards, or a template."""
    argv = _snakemake_argv()
    if argv is None:
        return "snakemake --cores N <your usual --config/--configfile> --forcerun " + " ".join(
            shlex.quote(p) for p in shard_paths
        )
    kept, dropping = [], False
    for arg in argv:
        if dropping and not arg.startswith("-"):
            continue  # a value of the dropped option (--forcerun takes several)
        dropping = arg in _DROP_WITH_VALUE
        if dropping or arg in _DROP_FLAGS or arg.split("=", 1)[0] in _DROP_WITH_VALUE:
            continue
        if arg.startswith("force_regenerate="):
            continue  # repeating it would regenerate every shard, not just the bad ones
        kept.append(arg)
    # A --config left without values would be a usage error.
    kept = [
        arg
        for i, arg in enumerate(kept)
        if arg not in ("--config", "-C") or (i + 1 < len(kept) and not kept[i + 1].startswith("-"))
    ]
    return shlex.join([*kept, "--forcerun", *shard_paths])


def gather(
    layout: RunLayout, workers: int | None = None, tokenizer_source: Path | None = None
) -> None:
    """Validate every planned shard of the run, then index them into one store."""
    start = time.time()
    plan = load_plan(layout)
    index_out, manifest_out = layout.index, layout.manifest
    shard_paths = [str(layout.shard(i)) for i in range(int(plan["num_shards"]))]
    masked_only = bool(plan["settings"]["generation"].get("store_masked_only", False))
    temperatures = planned_temperatures(plan["settings"])
    store_dir = layout.output_dir
    # Not num_shards: shards planned when the run was smaller (appended data) say fewer.
    expected_common = {
        "top_k": plan["top_k"],
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
    }
    if "teacher_content_digest" in plan:  # plans from before it have none, nor their shards
        expected_common["teacher_content_digest"] = plan["teacher_content_digest"]
    # Before hours of validation: the index and the manifest must fit, side by side.
    index_need, manifest_need = gather_bytes(
        int(plan["num_samples"]), len(shard_paths), layout.plan.stat().st_size
    )
    try:
        ensure_room(partial_path(index_out), index_need, index_out, alongside=manifest_need)
        ensure_room(partial_path(manifest_out), manifest_need, manifest_out, alongside=index_need)
    except DiskFullError as exc:
        raise DiskFullError(f"{exc}; {NO_STORE}") from None

    planned = planned_samples(layout)
    found = check_shards(layout, plan, expected_common, workers, planned)
    summaries = found.summaries
    if found.problems:
        raise ShardError(bad_shards_message(found.problems, found.identities, expected_common))
    checked_s = time.time() - start

    all_ids = np.concatenate([s.sample_ids for _, _, s in summaries])
    if len(np.unique(all_ids)) != len(all_ids):
        raise ShardError(
            "a sample id appears in more than one shard; rerun prepare and all shards "
            f"(force_regenerate=true); {NO_STORE}"
        )
    if not np.array_equal(np.sort(all_ids), np.sort(planned.sample_ids)):
        raise ShardError(
            "the shards do not hold exactly the samples prepare planned; rerun with "
            f"force_regenerate=true; {NO_STORE}"
        )

    # Per-sample index in sample-id order: which shard, which position inside it.
    shard_of = np.concatenate([np.full(s.num_samples, i, dtype=np.int32) for i, _, s in summaries])
    position = np.concatenate([np.arange(s.num_samples, dtype=np.int64) for _, _, s in summaries])
    lengths = np.concatenate([np.diff(s.offsets) for _, _, s in summaries])
    order = np.argsort(all_ids, kind="stable")
    relative = relative_paths([p for _, p, _ in summaries], store_dir)

    # Both files are written beside their final names, then renamed together: a full disk
    # (or any error) leaves neither a .partial nor an index without its manifest.
    index_temp, manifest_temp = partial_path(index_out), partial_path(manifest_out)
    try:
        attrs = {
            **expected_common,
            "num_shards": len(shard_paths),
            "format_version": FORMAT_VERSION,
            "num_samples": len(all_ids),
            "num_tokens": int(lengths.sum()),
            "has_loss_mask": all(s.loss_mask_ones is not None for _, _, s in summaries),
            "masked_only": masked_only,
            # Every index says which temperatures its records carry (the reader's default: [1.0]).
            TEMPERATURES_ATTR: json.dumps(list(temperatures)),
            "vocab_size": int(plan["vocab_size"]),
        }
        if plan.get("tokenizer_content_fingerprint"):  # plans made before it have none
            attrs["tokenizer_content_fingerprint"] = plan["tokenizer_content_fingerprint"]
        if tokenizer_source is not None:
            # Before the index: every store that has an index has its tokenizer beside it.
            try:
                copy_tokenizer_files(tokenizer_source, layout.tokenizer_dir)
            except TeacherError as exc:  # the store is whole without it; the check says so
                log.warning("no tokenizer copy in the store: %s", exc)
        columns = {
            "sample_ids": all_ids[order],
            "sample_shard": shard_of[order],
            "sample_position": position[order],
            "sample_length": lengths[order],
            # By shard: what a reader opened on this index checks each shard it opens against.
            SHARD_FINISHED_AT: np.array(
                [float(s.attrs["finished_at"]) for _, _, s in summaries], dtype=np.float64
            ),
        }
        write_index(index_temp, index_out, attrs, relative, columns)

        total_tokens = int(lengths.sum())
        shards = [shard_entry(i, p, rel, s) for (i, p, s), rel in zip(summaries, relative)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_at": time.time(),
            "num_samples": len(all_ids),
            "num_tokens": total_tokens,
            "top_k": plan["top_k"],
            "temperatures": list(temperatures),
            "vocab_size": plan["vocab_size"],
            "teacher_fingerprint": plan["teacher_fingerprint"],
            "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
            "tokenizer_content_fingerprint": plan.get("tokenizer_content_fingerprint"),
            "config_fingerprint": plan["config_fingerprint"],
            "teacher_content_digest": plan.get("teacher_content_digest"),
            "settings": plan["settings"],
            "shards": shards,
            "dropped": plan["dropped"],
            "special_token_strings": plan.get("special_token_strings"),
            "truncated_samples": plan["truncated_samples"],
            "split_samples": plan.get("split_samples", 0),
            **loss_mask_counts([s for _, _, s in summaries]),
            "stats": run_statistics([s for _, _, s in summaries], shards, plan, index_temp),
        }
        # `python -m teacher_logits.verify` checks a copied store against these.
        manifest["index"] = {
            "path": os.path.relpath(Path(index_out).resolve(), store_dir.resolve()),
            "sha256": file_sha256(index_temp),
            "bytes": os.path.getsize(index_temp),
        }
        write_text_guarded(manifest_out, json.dumps(manifest, indent=1), rename=False)
        os.replace(index_temp, index_out)
        os.replace(manifest_temp, manifest_out)
    except BaseException as exc:
        for path in (index_temp, manifest_temp):
            path.unlink(missing_ok=True)
        if isinstance(exc, DiskFullError):
            raise DiskFullError(f"{exc}; {NO_STORE}") from None
        raise
    # The store is complete: the copies generate kept for a killed run are not needed.
    remove_parts_dirs(shard_paths)
    seconds = time.time() - start
    log.info(
        "gathered %d shards (%d checked now, %d unchanged), %d samples, %d tokens in %.1f s "
        "(%.1f s checking, %.1f s indexing; %.0f tokens/s); mean top-k mass %.3f",
        len(summaries),
        len(summaries) - found.cached,
        found.cached,
        len(all_ids),
        total_tokens,
        seconds,
        checked_s,
        seconds - checked_s,
        total_tokens / max(seconds, 1e-9),
        manifest["stats"]["mean_topk_mass"],
    )


def relative_paths(paths: list[str], store_dir: Path) -> list[str]:
    """Each shard's path relative to the store, through symlinks as ``resolve`` sees them;
    a folder is resolved once, not once per shard."""
    base, folders, out = store_dir.resolve(), {}, []
    for path in map(Path, paths):
        if path.is_symlink():
            out.append(os.path.relpath(path.resolve(), base))
            continue
        if path.parent not in folders:
            folders[path.parent] = path.parent.resolve()
        out.append(os.path.relpath(folders[path.parent] / path.name, base))
    return out


def write_index(temp: Path, target: Path, attrs: dict, shard_paths: list, columns: dict) -> None:
    """``index.h5`` into ``temp``: checked for room first, and through a ``GuardedFile``, so a
    full disk is one ``DiskFullError`` line and never a libhdf5 crash."""
    needed = sum(c.nbytes for c in columns.values()) + 256 * (len(shard_paths) + 1) + 65536
    ensure_room(temp, needed, target=target)
    guard = GuardedFile(temp, target=target)
    try:
        with disk_full_is_a_user_error(target), h5py.File(guard, "w") as f:
            f.attrs.update(attrs)
            f.create_dataset(
                "shard_paths", data=np.array(shard_paths, dtype=object), dtype=h5py.string_dtype()
            )
            for name, values in columns.items():
                f.create_dataset(name, data=values)
        guard.close()  # fsync; raises if the disk refused a write
    except BaseException:
        guard.discard()
        raise


def bad_shards_message(problems: list, identities: dict, expected: dict) -> str:
    """Gather's error: a first line that names the bad shards and what to do (it is what
    ``status`` shows), one line per shard saying why, then the command that redoes them."""
    bad = [index for index, _, _ in problems]
    conflicts = fingerprint_conflicts(identities, expected, PLAN_NAME)
    them = "it" if len(bad) == 1 else "them"
    first = "; ".join(
        [
            *conflicts,
            f"{len(bad)} shard(s) failed validation ({shard_list(bad)})",
            f"regenerate {them} with the command below (or delete {them} and rerun the same "
            "command; force_regenerate=true regenerates every shard); finished shards were "
            f"not touched; {NO_STORE}",
        ]
    )
    lines = [f"shard {i} ({path}): {why}" for i, path, why in problems]
    return (
        f"{first}:\n  "
        + "\n  ".join(lines)
        + f"\nRegenerate them with: {regenerate_hint([path for _, path, _ in problems])}"
    )
