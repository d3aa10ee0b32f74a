"""Token-budget batches that read a store shard by shard: ``ShardLocalBatchSampler``.

Needs numpy only (no torch): it is a plain iterable of index lists, which is all
``torch.utils.data.DataLoader(batch_sampler=...)`` asks of a batch sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import TrainingInputError

# What a checkpoint must agree on with the sampler it is loaded into: each changes the
# batches, so resuming under another value would skip the wrong samples.
_PLAN_KEYS = (
    "seed",
    "world_size",
    "max_tokens",
    "max_length",
    "drop_last",
    "pool_batches",
    "num_samples",
)
# Random keys that order samples of equal length, and batches, within a pool.
_TIE_RANGE = 1 << 20
# A pool never spans more shards than this, so a reader that keeps this many shards
# open reads a pool without reopening any.
MAX_SHARDS_PER_POOL = 8


@dataclass(frozen=True)
class _EpochPlan:
    order: np.ndarray  # store indices, batch after batch, in the epoch's order
    batch_starts: np.ndarray  # batch b is order[batch_starts[b]:batch_starts[b + 1]]


class ShardLocalBatchSampler:
    """Batches of store indices within a token budget, read shard by shard.

    ``DataLoader(store, batch_sampler=sampler, collate_fn=collate)``.

    Samples are batched within a *pool*: one shard, or, where shards are too small to
    find samples of similar length in (fewer than ``pool_batches`` x ``max_tokens``
    tokens), a few neighbouring shards (by shard number, at most
    ``MAX_SHARDS_PER_POOL``) taken together. Pools are fixed; each epoch:

    1. the pools are put in a random order (seeded by ``seed`` and the epoch);
    2. within each pool the samples are sorted by length (ties in random order) and
       cut greedily into batches whose padded size, samples x longest length (lengths
       capped at ``max_length`` when given, as ``collate`` crops them), stays within
       ``max_tokens``. A sample longer than ``max_tokens`` on its own is a batch of one
       (over the budget: crop with ``max_length`` to avoid it);
    3. the batches of each pool are shuffled among themselves, and the pools'
       batches are put one after another;
    4. rank ``r`` of ``world_size`` takes the r-th of ``world_size`` contiguous, equal
       slices of that list, so it reads whole shards (pools) or long runs of one, and
       opens about ``num_shards / world_size`` shards per epoch, plus those of the two
       pools at the ends of its slice.

    Every rank gets the same number of batches (``DistributedDataParallel`` hangs
    otherwise). With ``drop_last=False`` (the default, like ``DistributedSampler``)
    the list is padded by repeating the epoch's first batches, so a few samples are
    seen twice; with ``drop_last=True`` the last ``num_batches % world_size`` batches
    of the epoch are left out instead (they change from epoch to epoch). Every other
    sample is in exactly one batch on one rank per epoch. The number of batches is
    the same in every epoch: only the order changes.

    The batches depend only on (store lengths and shards, ``seed``, epoch,
    ``world_size``, ``max_tokens``, ``max_length``, ``drop_last``, ``pool_batches``):
    every process and every call gives the same ones (with the same numpy version,
    whose ``Generator`` streams it uses), and no global random state is used or
    changed. Call ``set_epoch(e)`` before each epoch, as with ``DistributedSampler``;
    iterating twice without it repeats the epoch.

    Resuming: ``state_dict()`` records the epoch and how many batches of it are done;
    ``load_state_dict(state)`` makes the next iteration start after them. The
    sampler counts the batches it has handed out, but a DataLoader fetches ahead
    (``prefetch_factor`` x ``num_workers`` batches), so a training loop should pass
    the steps it really finished: ``sampler.state_dict(batches_done=step_in_epoch)``.
    The state holds no rank: every rank can load the state rank 0 saved.
    """

    def __init__(
        self,
        store,
        max_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        max_length: int | None = None,
        drop_last: bool = False,
        pool_batches: int = 64,
    ):
        if int(max_tokens) <= 0:
            raise TrainingInputError(
                f"max_tokens must be a positive number of tokens, not {max_tokens}"
            )
        if int(world_size) < 1:
            raise TrainingInputError(f"world_size must be at least 1, not {world_size}")
        if not 0 <= int(rank) < int(world_size):
            raise TrainingInputError(
                f"rank must be in [0, {world_size}) for world_size {world_size}, not {rank}"
            )
        if int(seed) < 0:
            raise TrainingInputError(f"seed must be a non-negative integer, not {seed}")
        if max_length is not None and int(max_length) < 2:
            raise TrainingInputError(
                f"max_length must be at least 2 tokens (as collate's) or None, not {max_length}"
            )
        if int(pool_batches) < 0:
            raise TrainingInputError(
                f"pool_batches must be a non-negative number of batches, not {pool_batches}"
            )
        self.max_tokens = int(max_tokens)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.max_length = None if max_length is None else int(max_length)
        self.drop_last = bool(drop_last)
        self.pool_batches = int(pool_batches)

        shards = np.asarray(store.sample_shard)
        lengths = np.asarray(store.sample_length, dtype=np.int64)
        self.num_samples = len(store)
        if len(shards) != self.num_samples or len(lengths) != self.num_samples:
            raise TrainingInputError(
                f"the store's sample_shard ({len(shards)}) and sample_length ({len(lengths)}) "
                f"do not match its {self.num_samples} samples"
            )
        if self.max_length is not None:
            lengths = np.minimum(lengths, self.max_length)
        # An empty sample still takes a row of the batch.
        costs = np.maximum(lengths, 1)
        _, shard_code = np.unique(shards, return_inverse=True)
        pool = self._pools(shard_code.reshape(-1), costs)
        self._prepare_batches(pool, costs)

        self.epoch = 0
        self._resume_at = 0  # batches of self.epoch to skip on the next iteration
        self._batches_done = 0
        self._plan: _EpochPlan | None = None
        self._plan_epoch: int | None = None

    # -- the epoch's batches --------------------------------------------------------

    def _pools(self, shard_code: np.ndarray, costs: np.ndarray) -> np.ndarray:
        """Each sample's pool (0..P-1): shards in number order, grouped until a group
        holds ``pool_batches`` budgets of tokens or ``MAX_SHARDS_PER_POOL`` shards."""
        shard_tokens = np.bincount(shard_code, weights=costs).tolist()
        enough = self.pool_batches * self.max_tokens
        pool_of_shard, pool, tokens, shards = [], 0, 0, 0
        for count in shard_tokens:
            if shards and (tokens >= enough or shards == MAX_SHARDS_PER_POOL):
                pool, tokens, shards = pool + 1, 0, 0
            pool_of_shard.append(pool)
            tokens, shards = tokens + count, shards + 1
        return np.asarray(pool_of_shard, dtype=np.int64)[shard_code]

    def _prepare_batches(self, pool: np.ndarray, costs: np.ndarray) -> None:
        """What every epoch shares: samples sorted by (pool, length) and cut into
        batches. An epoch only reorders pools, batches within a pool, and samples of
        equal length within a pool, none of which changes the batch sizes."""
        n = len(costs)
        max_cost = int(costs.max(initial=1))
        self._sorted = np.argsort(pool * (max_cost + 1) + costs, kind="stable")
        sorted_pool, sorted_cost = pool[self._sorted], costs[self._sorted]
        self._num_pools = int(sorted_pool[-1]) + 1 if n else 0
        starts = self._greedy_batch_starts(sorted_cost, sorted_pool)
        self._batch_first = starts
        self._batch_size = np.diff(np.append(starts, n))
        self._batch_pool = sorted_pool[starts]
        # Samples of one pool and one length form a run; an epoch shuffles each run.
        new_run = np.ones(n, dtype=bool)
        new_run[1:] = (np.diff(sorted_pool) != 0) | (np.diff(sorted_cost) != 0)
        run_first = np.flatnonzero(new_run)
        self._run_start = np.repeat(run_first, np.diff(np.append(run_first, n)))

    def _build_plan(self, epoch: int) -> _EpochPlan:
        n = self.num_samples
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        # Ties: sort by (run start, random bits). The keys are almost sorted already,
        # which the stable sort runs through in linear time.
        tie_key = self._run_start * _TIE_RANGE + rng.integers(0, _TIE_RANGE, n)
        order = self._sorted[np.argsort(tie_key, kind="stable")]

        position_of_pool = np.empty(self._num_pools, dtype=np.int64)
        position_of_pool[rng.permutation(self._num_pools)] = np.arange(self._num_pools)
        # Pools in their random order; the batches of one pool shuffled among themselves.
        batch_key = position_of_pool[self._batch_pool] * _TIE_RANGE + rng.integers(
            0, _TIE_RANGE, len(self._batch_first)
        )
        batch_order = np.argsort(batch_key, kind="stable")
        sizes = self._batch_size[batch_order]
        new_starts = np.concatenate(([0], np.cumsum(sizes)))
        # Position p of the new order reads old position first[b] + (p - new_start[b]).
        offsets = np.arange(n) - np.repeat(new_starts[:-1], sizes)
        reordered = order[np.repeat(self._batch_first[batch_order], sizes) + offsets]
        return _EpochPlan(order=reordered, batch_starts=new_starts)

    def _greedy_batch_starts(self, costs: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """Where each batch starts in samples sorted by (pool, length): a batch grows
        while count x its longest (= its last) length fits ``max_tokens`` and stops at
        the end of its pool.

        Batch [s, e) fits when e - s <= max_tokens // costs[e-1], i.e. when
        g[e-1] <= s with g[j] = j + 1 - capacity[j]. Within a pool g strictly grows
        (lengths ascend, so capacity does not grow), so the end of the batch starting
        at s is found for every s at once by a binary search on g; only the walk from
        one batch start to the next is sequential, one step per batch.
        """
        n = len(costs)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        j = np.arange(n, dtype=np.int64)
        capacity = np.minimum(self.max_tokens // costs, n)
        first_of_pool = np.flatnonzero(np.diff(pool, prepend=-1))
        pool_start = np.repeat(first_of_pool, np.diff(np.append(first_of_pool, n)))
        # One increasing key over all pools: pool, then g within the pool (shifted by n
        # so it is positive and below the stride).
        stride = 2 * n + 2
        key = pool * stride + (j + 1 - capacity - pool_start + n)
        target = pool * stride + (j - pool_start + n)
        batch_end = np.maximum(j + 1, np.searchsorted(key, target, side="right"))

        next_start = batch_end.tolist()
        starts = []
        s = 0
        while s < n:
            starts.append(s)
            s = next_start[s]
        return np.asarray(starts, dtype=np.int64)

    def _epoch_plan(self) -> _EpochPlan:
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self._build_plan(self.epoch), self.epoch
        return self._plan

    def _batches_per_rank(self, num_batches: int) -> int:
        if self.drop_last:
            return num_batches // self.world_size
        return math.ceil(num_batches / self.world_size)

    def _rank_batches(self, plan: _EpochPlan) -> np.ndarray:
        """This rank's batch numbers: its contiguous slice of the epoch, padded (by
        wrapping to the epoch's first batches) or cut so every rank has as many."""
        num_batches = len(plan.batch_starts) - 1
        per_rank = self._batches_per_rank(num_batches)
        if num_batches == 0:
            return np.zeros(0, dtype=np.int64)
        first = self.rank * per_rank
        return np.arange(first, first + per_rank) % num_batches

    # -- the sampler protocol -------------------------------------------------------

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank and in every epoch)."""
        return self._batches_per_rank(len(self._batch_first))

    def __iter__(self):
        plan = self._epoch_plan()
        order, starts = plan.order, plan.batch_starts
        skip, self._resume_at = self._resume_at, 0
        self._batches_done = skip
        for b in self._rank_batches(plan)[skip:]:
            self._batches_done += 1
            yield order[starts[b] : starts[b + 1]].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from the next iteration on. Setting the epoch a
        loaded state is in keeps its resume point; another epoch starts from batch 0."""
        if int(epoch) < 0:
            raise TrainingInputError(f"epoch must be a non-negative integer, not {epoch}")
        if int(epoch) != self.epoch:
            self.epoch, self._resume_at, self._batches_done = int(epoch), 0, 0

    # -- checkpoints ----------------------------------------------------------------

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Where this epoch stands. ``batches_done`` defaults to the batches handed out so
        far, which runs ahead of training under DataLoader prefetching: pass the number
        of optimizer steps finished in this epoch instead."""
        done = self._batches_done if batches_done is None else int(batches_done)
        return {
            "epoch": self.epoch,
            "batches_done": done,
            "seed": self.seed,
            "world_size": self.world_size,
            "max_tokens": self.max_tokens,
            "max_length": self.max_length,
            "drop_last": self.drop_last,
            "pool_batches": self.pool_batches,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields epoch ``state["epoch"]``'s batches after the
        first ``state["batches_done"]``. Refuses a state made with other batches."""
        mine = self.state_dict()
        differ = [k for k in _PLAN_KEYS if k in state and state[k] != mine[k]]
        if differ:
            said = ", ".join(f"{k}={state[k]!r} (this sampler: {mine[k]!r})" for k in differ)
            raise TrainingInputError(
                f"the sampler state was saved with {said}; resume with the same values, "
                "or start the epoch afresh without load_state_dict"
            )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if epoch < 0 or done < 0:
            raise TrainingInputError(
                f"the sampler state has epoch {epoch} and batches_done {done}; both must be >= 0"
            )
        self.epoch, self._resume_at, self._batches_done = epoch, done, done
