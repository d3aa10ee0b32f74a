"""``KDTrainer``: a Hugging Face ``Trainer`` that trains a student on a store.

    train, held_out = LogitStore("results/demo").split(0.05, seed=0)
    trainer = KDTrainer(model=student, args=TrainingArguments(output_dir="out", max_steps=600),
                        train_dataset=train, eval_dataset=held_out, kd=KDConfig(ce_weight=0.5))
    trainer.train(); trainer.evaluate()

What it changes in ``Trainer``:

- loaders: ``ShardLocalBatchSampler`` batches (``KDConfig.max_tokens`` tokens, rank and
  world size from ``args``, seed ``args.data_seed`` or ``args.seed``) collated by
  ``collate``; no column is removed, whatever ``remove_unused_columns`` says, and
  ``per_device_train_batch_size`` plays no part.
- loss: ``kd_loss`` on the student's logits (its ``labels`` are never handed to the
  model, which would shift them again). Over the micro-batches of one optimizer step
  the loss is the sum over their ``kd_mask`` rows divided by the rows of all of them
  (on all ranks when ``args.average_tokens_across_devices``, the default), so
  accumulating micro-batches gives the gradient of one batch of their union.
- checkpoints: each holds ``kd_sampler.json`` (the sampler's ``state_dict``). A resumed
  run refuses another seed, token budget, world size or store, and continues the
  same batches: ``Trainer`` skips the batches already trained by iterating the
  sampler's index lists (no sample is read), and the sampler is set to the saved
  epoch without skipping again.
- ``evaluate()``: ``eval_loss`` (the training objective), ``eval_perplexity`` (exp of
  the cross-entropy per token) and ``eval_kl`` (KL to the teacher's stored rows at
  the training temperature and tail), each per ``kd_mask`` row over the whole set.

This module imports transformers; ``teacher_logits.training`` imports it only when
``KDTrainer`` or ``KDConfig`` is first used.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..errors import TrainingInputError
from ..layout import partial_path
from ..store.reader import LogitStore
from ..store.views import StoreView
from .collation import collate
from .losses import TAILS, kd_loss
from .sampler import ShardLocalBatchSampler

# Written into every checkpoint folder next to Trainer's own files.
SAMPLER_STATE = "kd_sampler.json"


@dataclass
class KDConfig:
    """How ``KDTrainer`` batches and weighs: ``kd_loss``'s ``temperature``, ``tail`` and
    ``ce_weight``; ``max_tokens`` per batch (padded size, the sampler's budget);
    ``max_length`` crops samples (``collate``)."""

    temperature: float = 1.0
    tail: str = "bucket"
    ce_weight: float = 0.5
    max_tokens: int = 16384
    max_length: int | None = None

    def __post_init__(self):
        if self.tail not in TAILS:
            raise TrainingInputError(f"KDConfig(tail={self.tail!r}); use one of {', '.join(TAILS)}")
        if not 0.0 <= float(self.ce_weight) <= 1.0:
            raise TrainingInputError(
                f"KDConfig(ce_weight={self.ce_weight!r}); use a number in [0, 1]"
            )


def _check_store(dataset, what: str) -> None:
    if not isinstance(dataset, (LogitStore, StoreView)):
        raise TrainingInputError(
            f"KDTrainer: {what} is a {type(dataset).__name__}; pass a LogitStore or a view of "
            "one (store.split(...) or store.select(...))"
        )


class _SamplerEpoch(TrainerCallback):
    """Sets the training sampler's epoch as each epoch begins (Trainer reaches a batch
    sampler only through accelerate's wrappers, which these loaders do not use)."""

    def __init__(self, trainer: KDTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._train_sampler
        if sampler is not None:
            sampler.set_epoch(self.trainer._position(state.global_step, len(sampler))[0])


class KDTrainer(Trainer):
    """``Trainer`` over a ``LogitStore`` (or a view of one); ``kd`` a ``KDConfig``."""

    # compute_loss divides by the rows of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, kd: KDConfig | None = None, **kwargs):
        self.kd = kd if kd is not None else KDConfig()
        if not isinstance(self.kd, KDConfig):
            raise TrainingInputError(
                f"KDTrainer: kd is a {type(self.kd).__name__}; pass a KDConfig"
            )
        for what in ("train_dataset", "eval_dataset"):
            dataset = kwargs.get(what)
            for part in dataset.values() if isinstance(dataset, dict) else [dataset]:
                if part is not None:
                    _check_store(part, what)
        kwargs.setdefault(
            "data_collator", functools.partial(collate, max_length=self.kd.max_length)
        )
        super().__init__(*args, **kwargs)
        self._train_sampler: ShardLocalBatchSampler | None = None
        self._resume_dir: str | None = None
        self._rows_global = False  # whether num_items_in_batch counts every rank's rows
        self._parts = torch.zeros(3, dtype=torch.float64)  # kd sum, ce sum, rows since the last log
        self.add_callback(_SamplerEpoch(self))

    # -- loaders --------------------------------------------------------------------

    def _sampler(self, store, rank: int, world_size: int) -> ShardLocalBatchSampler:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ShardLocalBatchSampler(
            store,
            self.kd.max_tokens,
            rank=rank,
            world_size=world_size,
            seed=seed,
            max_length=self.kd.max_length,
            drop_last=self.args.dataloader_drop_last,
        )

    def _loader(self, store, batch_sampler) -> DataLoader:
        workers = self.args.dataloader_num_workers
        return DataLoader(
            store,
            batch_sampler=batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=bool(workers) and self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise TrainingInputError(
                "KDTrainer.train needs a train_dataset: a LogitStore or a view"
            )
        _check_store(self.train_dataset, "train_dataset")
        sampler = self._sampler(self.train_dataset, self.args.process_index, self.args.world_size)
        if self._resume_dir is not None:
            self._restore_sampler(sampler, self._resume_dir)
        self._train_sampler = sampler
        return self._loader(self.train_dataset, sampler)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """This rank's contiguous share of one world-size-1 epoch: every held-out sample
        is read exactly once over all ranks (evaluation needs no equal batch counts)."""
        dataset = self._eval_set(eval_dataset)
        batches = list(self._sampler(dataset, rank=0, world_size=1))
        rank, world = self.args.process_index, self.args.world_size
        share = batches[rank * len(batches) // world : (rank + 1) * len(batches) // world]
        return self._loader(dataset, share)

    def _eval_set(self, eval_dataset):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if dataset is None:
            raise TrainingInputError(
                "KDTrainer.evaluate needs an eval_dataset: a LogitStore or a view"
            )
        _check_store(dataset, "eval_dataset")
        return dataset

    # -- checkpoints ----------------------------------------------------------------

    def _position(self, global_step: int, batches_per_epoch: int) -> tuple[int, int]:
        """(epoch, micro-batches of it trained) after ``global_step`` optimizer steps, as
        ``Trainer`` counts them when it resumes."""
        accumulation = self.args.gradient_accumulation_steps
        per_epoch = max(math.ceil(batches_per_epoch / accumulation), 1)
        epoch, steps = divmod(int(global_step), per_epoch)
        return epoch, steps * accumulation

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self._resume_dir = (
            resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        )
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._resume_dir = None

    def _save_checkpoint(self, model, trial):
        # Written before Trainer's files, so a checkpoint Trainer can resume from has it.
        if self._train_sampler is not None and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial),
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}",
            )
            os.makedirs(folder, exist_ok=True)
            sampler = self._train_sampler
            epoch, done = self._position(self.state.global_step, len(sampler))
            state = {**sampler.state_dict(batches_done=done), "epoch": epoch}
            final = os.path.join(folder, SAMPLER_STATE)
            with open(partial_path(final), "w") as handle:
                json.dump(state, handle, indent=1)
            os.replace(partial_path(final), final)
        super()._save_checkpoint(model, trial)

    def _restore_sampler(self, sampler: ShardLocalBatchSampler, checkpoint: str) -> None:
        path = os.path.join(checkpoint, SAMPLER_STATE)
        if not os.path.isfile(path):
            if self.args.ignore_data_skip:
                return
            raise TrainingInputError(
                f"{checkpoint} has no {SAMPLER_STATE}: it was not written by KDTrainer; resume "
                "from a KDTrainer checkpoint, or set ignore_data_skip=True to restart its epoch"
            )
        with open(path) as handle:
            state = json.load(handle)
        with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
            global_step = int(json.load(handle)["global_step"])
        # Trainer itself skips the epoch's trained batches (or, with ignore_data_skip,
        # restarts the epoch): the sampler starts the epoch at its first batch.
        sampler.load_state_dict({**state, "batches_done": 0})  # refuses other batches
        epoch, done = self._position(global_step, len(sampler))
        if not self.args.ignore_data_skip and (state["epoch"], state["batches_done"]) != (
            epoch,
            done,
        ):
            raise TrainingInputError(
                f"{path} stands at epoch {state['epoch']} batch {state['batches_done']} but this "
                f"run would resume at epoch {epoch} batch {done}; resume with the "
                "gradient_accumulation_steps and dataloader_drop_last the checkpoint was written with"
            )

    # -- the loss -------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The optimizer step's micro-batches and their ``kd_mask`` rows (collate already
        shifted the labels: no row is dropped as Trainer's causal-LM count would)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        rows = torch.tensor(sum(int(b["kd_mask"].sum()) for b in batches), device=device)
        self._rows_global = self.args.average_tokens_across_devices and self.args.world_size > 1
        if self._rows_global:
            rows = self.accelerator.reduce(rows, reduction="sum")
        return batches, rows

    def _parts_of(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's KL to the teacher and its cross-entropy, each a mean per row;
        a part weighted 0 is computed without a gradient, for the logs only."""
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).logits
        kd, vocab = self.kd, getattr(self.train_dataset or self.eval_dataset, "vocab_size", None)
        parts = []
        for ce_weight, weight in ((0.0, 1.0 - kd.ce_weight), (1.0, kd.ce_weight)):
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                parts.append(
                    kd_loss(
                        logits,
                        inputs,
                        temperature=kd.temperature,
                        tail=kd.tail,
                        ce_weight=ce_weight,
                        teacher_vocab_size=vocab,
                    )
                )
        return parts[0], parts[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl, ce = self._parts_of(model, inputs)
        loss = (1.0 - self.kd.ce_weight) * kl + self.kd.ce_weight * ce
        rows = inputs["kd_mask"].sum()
        if model.training:
            self._parts += (
                torch.stack([kl.detach() * rows, ce.detach() * rows, rows]).double().cpu()
            )
        if num_items_in_batch is not None:
            # Sum over this micro-batch's rows / rows of the whole step: the union's mean.
            loss = loss * rows / torch.clamp(torch.as_tensor(num_items_in_batch), min=1)
            if self._rows_global:  # DDP averages gradients over ranks: undo its division
                loss = loss * self.args.world_size
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every rank is here
            sums = self._parts.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            if float(sums[2]) > 0:
                logs = {
                    **logs,
                    "kd_loss": float(sums[0] / sums[2]),
                    "ce_loss": float(sums[1] / sums[2]),
                }
            self._parts.zero_()
        super().log(logs, start_time)

    # -- evaluation -----------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(sets, dict):
            metrics = {}
            for name, dataset in sets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        loader = self.get_eval_dataloader(eval_dataset)
        model, was_training = self.model, self.model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for batch in loader:
                batch = self._prepare_inputs(batch)
                kl, ce = self._parts_of(model, batch)
                rows = batch["kd_mask"].sum()
                sums += torch.stack([kl * rows, ce * rows, rows]).double()
        model.train(was_training)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        rows = max(float(sums[2]), 1.0)
        kl, ce = float(sums[0]) / rows, float(sums[1]) / rows
        prefix = metric_key_prefix
        metrics = {
            f"{prefix}_loss": (1.0 - self.kd.ce_weight) * kl + self.kd.ce_weight * ce,
            f"{prefix}_perplexity": math.exp(ce),
            f"{prefix}_kl": kl,
            f"{prefix}_tokens": float(sums[2]),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics
