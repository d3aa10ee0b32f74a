"""One shard's generate job: claim a GPU group, compute what is not yet committed,
assemble the shard and commit it atomically.

The claim comes first (inside the running job, never at plan time) and sets
``CUDA_VISIBLE_DEVICES``; torch is imported only after it, so CUDA sees exactly
the claimed group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from ..disk import check_shard_fits, disk_full_is_a_user_error
from ..errors import ShardError, TeacherError
from ..fingerprints import teacher_content_digest, teacher_fingerprint, tokenizer_fingerprint
from ..gpus import gpu_claim
from ..layout import PARTS_ASSEMBLED, RunLayout
from ..sampling import row_keys
from ..settings import GenerateSettings
from ..shard_plan import job_plan
from ..store.format import FORMAT_VERSION, read_attrs
from ..store.prepared import read_prepared_shard
from ..store.validate import ShardExpectation, validate_shard
from .batching import windows
from .parts import CommittedParts, job_lock
from .progress import progress_bar
from .provenance import scheduler_job_id, shard_attrs
from .writing import (
    PART_MAX_ROWS,
    PartCommitter,
    ShardSink,
    WriterThread,
    open_shard_writer,
    rows_in_stored_dtypes,
)

log = logging.getLogger("generate")

# A window of consecutive samples is computed, then written in order. Its size
# trades memory (results are held until written) against how well length sorting
# packs batches.
WINDOW_BATCHES = 32


def generate(settings: GenerateSettings, layout: RunLayout, shard: int) -> None:
    """Make ``layout.shard(shard)``, resuming from committed parts where they still hold."""
    job_started_at = time.time()
    output = layout.shard(shard)
    # Its own segment's plan and tokens: an append (a new segment) touches neither.
    job = job_plan(layout, shard)
    plan = job.plan
    check_teacher_matches_plan(settings.teacher.path, plan)
    prepared = read_prepared_shard(job.tokens, job.local_index)
    sample_ids, offsets, input_ids = prepared.shard_slice(0)
    loss_mask = prepared.loss_mask
    num_tokens = int(offsets[-1])
    content = content_attrs(plan, tokens_digest(sample_ids, offsets, input_ids, loss_mask))
    token = layout.regenerate_token.read_text().strip()
    identity = part_identity(settings, plan, (shard, job.segment_end), sample_ids, offsets, token)
    identity.update(content)
    # The cross-tokenizer fields (storage.cross_tokenizer_fields), where prepare made them.
    text = token_offsets = None
    with_fields = settings.cross_tokenizer_fields and prepared.text_bytes is not None
    identity["cross_tokenizer_fields"] = with_fields  # parts with and without do not mix
    if with_fields:
        text, token_offsets = (prepared.text_bytes, prepared.text_offsets), prepared.token_offsets
    elif settings.cross_tokenizer_fields:
        log.info(
            "shard %d: prepare made no texts and token offsets (prepared before them, or with "
            "storage.cross_tokenizer_fields off): the shard has no cross-tokenizer fields",
            shard,
        )

    with job_lock(output):
        if finished_by_an_earlier_job(output, {**plan, **content}, shard):
            log.info("shard %d was finished by an earlier job while this one waited", shard)
            return
        say_if_rows_changed(layout, shard, content["tokens_digest"])
        parts = CommittedParts(layout.parts_dir(shard), identity, num_tokens)
        # Not num_shards: it counts the shards there were when a shard was written.
        run_keys = ("top_k", "teacher_fingerprint", "tokenizer_fingerprint", "config_fingerprint")
        expected = ShardExpectation(
            sample_ids=sample_ids,
            offsets=offsets,
            input_ids=input_ids,
            attrs={"shard_index": shard, **{k: plan[k] for k in run_keys}, **content},
            vocab_size=plan["vocab_size"],
            loss_mask=loss_mask,
            masked_only=settings.store_masked_only,
            temperatures=settings.temperatures,
            samples=settings.sampling.draws,
            sample_mode=settings.sampling.mode,
            top_p=settings.top_p,
        )

        def is_valid(path):
            try:
                validate_shard(path, expected)
                return True
            except ShardError as exc:
                log.info("%s: %s", path, exc)
                return False

        if parts.take_assembled(output, is_valid):
            return
        # Only now: putting back a kept copy needs no room.
        check_shard_fits(
            layout,
            plan,
            shard,
            settings.value_dtype,
            settings.store_entropy,
            rows_per_part=min(PART_MAX_ROWS, WINDOW_BATCHES * settings.batch_tokens),
        )
        this_claim = {"teacher_load_seconds": 0.0, "rows": 0}
        live = open_shard_writer(output, sample_ids, offsets, settings, loss_mask, text)
        sink = ShardSink(live, input_ids, settings.store_entropy, loss_mask, token_offsets)
        try:
            if parts.rows_done < num_tokens:
                keys = row_keys(sample_ids, offsets) if settings.sampling.draws else None
                this_claim = compute_remaining(
                    settings, shard, parts, offsets, input_ids, sink, plan=plan, row_keys=keys
                )
            else:  # every row was committed by earlier jobs: copy them into the shard
                sink.replay(parts)
            if parts.rows_done != num_tokens:
                raise RuntimeError(
                    f"shard {shard}: {parts.rows_done} of {num_tokens} rows committed"
                )
            attrs = shard_attrs(
                plan, shard, parts, job_started_at, this_claim["teacher_load_seconds"]
            )
            attrs.update(content)
            with disk_full_is_a_user_error(output):
                live.commit(attrs)
        except BaseException:
            live.abort()
            raise
        parts.keep_assembled(output)


def compute_remaining(
    settings: GenerateSettings,
    shard: int,
    parts: CommittedParts,
    offsets: np.ndarray,
    input_ids: np.ndarray,
    sink: ShardSink,
    plan: dict,
    row_keys: np.ndarray | None = None,
) -> dict:
    """Claim a GPU group, run every window not yet committed, commit parts as it goes.

    Writing (part commits, and rows into the shard through ``sink``) happens in a
    writer thread while the next window computes.
    """
    scheduler = settings.devices.mode == "scheduler"
    holder = {"workflow": os.getcwd(), "shard": shard}
    with gpu_claim(settings.devices, holder=holder, first=shard) as claim:
        log.info(
            "shard %d: %d samples, %d tokens (%d left); CUDA_VISIBLE_DEVICES=%r on %s%s",
            shard,
            len(offsets) - 1,
            int(offsets[-1]),
            int(offsets[-1]) - parts.rows_done,
            claim.cuda_visible_devices,
            claim.hostname,
            f" (set by the scheduler, job {scheduler_job_id()})" if scheduler else "",
        )
        committer = PartCommitter(parts, claim, settings)
        writer = WriterThread()
        try:
            if parts.parts:
                # Rows an earlier claim committed go into the shard while the teacher loads.
                writer.submit(lambda: sink.replay(parts))
            import torch  # only now: CUDA must see the claimed group, nothing else

            # Same threads, same reductions: bit-identical reruns.
            torch.set_num_threads(settings.threads)
            load_start = time.time()
            with planned_engine(settings, claim, plan) as engine:
                load_seconds = time.time() - load_start
                log.info("teacher loaded in %.1f s (%s)", load_seconds, engine.description)
                committer.engine = engine.description
                run_windows(
                    engine,
                    WindowRun(
                        settings=settings,
                        shard=shard,
                        offsets=offsets,
                        input_ids=input_ids,
                        parts=parts,
                        committer=committer,
                        writer=writer,
                        sink=sink,
                        row_keys=row_keys,
                    ),
                )
            writer.submit(committer.commit)
            writer.close()
        except BaseException:
            try:
                writer.close()
            except BaseException:
                pass  # the first error is the one to report
            committer.abort()
            raise
        return {"teacher_load_seconds": load_seconds, "rows": committer.rows_computed}


@dataclass
class WindowRun:
    """Everything ``run_windows`` needs: the shard's tokens, where it resumes, and
    where finished windows go."""

    settings: GenerateSettings
    shard: int
    offsets: np.ndarray
    input_ids: np.ndarray
    parts: CommittedParts
    committer: PartCommitter
    writer: WriterThread
    sink: ShardSink
    # sampling.row_keys of the shard's rows (the sampled modes), else None.
    row_keys: np.ndarray | None = None


def run_windows(engine, run: WindowRun) -> None:
    from .compute import compute_window_split

    settings, offsets = run.settings, run.offsets
    first = run.parts.samples_done
    lengths = np.diff(offsets)
    with progress_bar(int(offsets[-1]), run.shard, initial=run.parts.rows_done) as bar:
        # Windows restart at the first uncommitted sample; the greedy split makes
        # them the same windows an uninterrupted run computes, so rows are bit-identical.
        for w0, w1 in windows(lengths[first:], WINDOW_BATCHES * settings.batch_tokens):
            s0, s1 = first + w0, first + w1
            r0, r1 = int(offsets[s0]), int(offsets[s1])
            started = time.time()
            rows = compute_window_split(
                engine,
                run.input_ids[r0:r1],
                offsets[s0 : s1 + 1] - r0,
                settings.batch_tokens,
                engine.pad_id,
                settings.max_length,
                settings.stride,
                None if run.row_keys is None else run.row_keys[r0:r1],
                with_targets=run.sink.with_text,
            )
            seconds = time.time() - started

            def write(s0=s0, r0=r0, n=s1 - s0, rows=rows, seconds=seconds):
                rows = rows_in_stored_dtypes(rows, settings)
                run.committer.add(s0, r0, n, rows, seconds)
                run.sink.add(r0, rows)

            run.writer.submit(write)
            bar.update(r1 - r0)


def finished_by_an_earlier_job(output: Path, plan: dict, shard: int) -> bool:
    """A job orphaned by a killed Snakemake may have finished this shard while we waited."""
    if not output.exists():
        return False
    try:
        with h5py.File(output, "r", locking=False) as handle:
            attrs = read_attrs(handle)
    except OSError:
        return False
    keys = ("config_fingerprint", "teacher_fingerprint", *CONTENT_ATTRS)
    return attrs.get("shard_index") == shard and all(attrs.get(k) == plan.get(k) for k in keys)


# Optional shard attributes (shards from before them lack them; validation then reads
# every input id against prepare's tokens, as always).
CONTENT_ATTRS = ("teacher_content_digest", "tokens_digest")


def tokens_digest(sample_ids, offsets, input_ids, loss_mask) -> str:
    """The shard's samples and token ids (and loss mask): an edit that keeps every row's
    length still changes it."""
    digest = hashlib.sha256()
    for array in (sample_ids, offsets, input_ids, loss_mask):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(b"\0")
    return digest.hexdigest()[:32]


def content_attrs(plan: dict, tokens: str) -> dict:
    """What the shard records of the exact content it was made from."""
    attrs = {"tokens_digest": tokens}
    if "teacher_content_digest" in plan:  # plans made before it have none
        attrs["teacher_content_digest"] = plan["teacher_content_digest"]
    return attrs


def check_teacher_matches_plan(teacher_path: Path, plan: dict) -> None:
    """The teacher about to be loaded is the one the plan was made for: weights copied
    over in place after prepare would otherwise mix two teachers in one store."""
    current = {
        "teacher_fingerprint": teacher_fingerprint(teacher_path),
        "tokenizer_fingerprint": tokenizer_fingerprint(teacher_path),
    }
    if "teacher_content_digest" in plan:
        current["teacher_content_digest"] = teacher_content_digest(teacher_path)
    changed = [key for key, value in current.items() if plan.get(key) != value]
    if changed:
        raise TeacherError(
            f"teacher.path: the files in {teacher_path} changed after prepare planned this run "
            f"({', '.join(f'{k} {plan.get(k)} -> {current[k]}' for k in changed)}); run the "
            "same snakemake command again: it plans anew and regenerates the shards made "
            "with the old files"
        )


@contextmanager
def planned_engine(settings: GenerateSettings, claim, plan: dict):
    """The engine on the teacher ``plan`` was made for, checked before and after it loads.

    The path is resolved once and the engine loads the folder that was fingerprinted, so
    a symlink switched meanwhile (tensor-parallel ranks load seconds after this check)
    changes nothing for this job. Files overwritten in place while they were read fail
    the second check, before a single row is written."""
    from .engine import open_engine

    settings = replace(settings, teacher=settings.teacher.resolved())
    # Again: the wait for a GPU group can be long, and the weights may be replaced.
    check_teacher_matches_plan(settings.teacher.path, plan)
    with open_engine(settings, claim) as engine:
        check_teacher_matches_plan(settings.teacher.path, plan)
        yield engine


def say_if_rows_changed(layout: RunLayout, shard: int, digest: str) -> None:
    """One line when the shard on disk (or its kept copy) was made from other token ids:
    its rows were edited since, so it is generated again."""
    for path in (layout.shard(shard), layout.parts_dir(shard) / PARTS_ASSEMBLED):
        try:
            with h5py.File(path, "r", locking=False) as handle:
                earlier = read_attrs(handle).get("tokens_digest")
        except OSError:
            continue
        if earlier and earlier != digest:
            log.warning(
                "shard %d: its rows changed since it was made (token digest %s -> %s): "
                "generating it again",
                shard,
                earlier,
                digest,
            )
        return


def part_identity(
    settings: GenerateSettings, plan: dict, place: tuple, sample_ids, offsets, regenerate_token: str
) -> dict:
    """What committed parts must share with this job to be kept (see ``CommittedParts``).

    ``place``: (shard, the shard after its segment's last). The second is fixed when the
    segment was planned (for the first plan: its num_shards, as parts recorded before
    appends), so an append invalidates no committed part."""
    plan_digest = hashlib.sha256(sample_ids.tobytes() + offsets.tobytes()).hexdigest()
    shard, segment_end = place
    return {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": plan["teacher_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "config_fingerprint": plan["config_fingerprint"],
        "top_k": settings.top_k,
        "value_dtype": settings.value_dtype,
        "store_entropy": settings.store_entropy,
        "temperatures": list(settings.temperatures),
        "shard_plan": f"{shard}/{segment_end}:{plan_digest}",
        "regenerate_token": regenerate_token,
    }
