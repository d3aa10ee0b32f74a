"""The student proof: train a small student with and without the store, compare held out.

Two students start from the same seed and see the same batches for the same
steps; one trains on ``kd_loss`` (KD mixed with cross-entropy), the other on
cross-entropy alone. Both are evaluated on the samples held out by a hash of
their id: perplexity, and the KL to the teacher over the full vocabulary with
the teacher recomputed (so the evaluation does not trust the store it judges).
Needs torch and transformers; the ``distill`` rule and ``bench/bench_distill.py``
call ``run_distill``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .store.views import holdout_mask

log = logging.getLogger("distill")


@dataclass(frozen=True)
class DistillSettings:
    store_dir: Path
    teacher_path: Path
    steps: int = 600
    batch_size: int = 16
    max_length: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    learning_rate: float = 3e-3
    ce_weight: float = 0.5
    tail: str = "auto"
    temperature: float = 1.0
    holdout_fraction: float = 0.05
    seed: int = 0
    eval_every: int = 100
    threads: int = 1

    @classmethod
    def from_config(cls, config: dict, threads: int = 1) -> DistillSettings:
        from .config import teacher_path

        section = config.get("distill") or {}
        known = set(cls.__dataclass_fields__) - {"store_dir", "teacher_path", "threads"}
        return cls(
            store_dir=Path(config["output_dir"]),
            teacher_path=teacher_path(config),
            threads=int(threads),
            **{key: value for key, value in section.items() if key in known},
        )


def student_config(vocab_size: int, settings: DistillSettings, teacher_config):
    """A small Llama over the teacher's vocabulary and special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.hidden_size * 8 // 3,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=max(1, settings.hidden_size // 16),
        num_key_value_heads=max(1, settings.hidden_size // 32),
        max_position_embeddings=settings.max_length,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
        tie_word_embeddings=True,
    )


def train_student(store, train_positions, settings: DistillSettings, kd: bool, probe):
    """One student; ``probe(model, step)`` is called every ``eval_every`` steps and at the end.

    The data order and the initial weights depend on ``settings.seed`` only, so the
    two students of one run differ in their loss and nothing else.
    """
    import torch
    from transformers import LlamaForCausalLM

    from .training import collate, kd_loss

    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(settings_student_config(store, settings))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    warmup = max(1, settings.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(settings.seed)
    ce_weight = settings.ce_weight if kd else 1.0
    for step in range(settings.steps):
        chosen = rng.choice(train_positions, size=settings.batch_size, replace=False)
        batch = collate([store[int(i)] for i in chosen], max_length=settings.max_length)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = kd_loss(
            logits, batch, temperature=settings.temperature, tail=settings.tail, ce_weight=ce_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            probe(model, step + 1)
    return model


def settings_student_config(store, settings: DistillSettings):
    from transformers import AutoConfig

    teacher_config = AutoConfig.from_pretrained(settings.teacher_path)
    vocab = store.vocab_size or teacher_config.vocab_size
    return student_config(int(vocab), settings, teacher_config)


class HeldOut:
    """The held-out samples, cropped like training, scored against the teacher's own logits.

    The teacher is run again batch by batch when a score needs it: nothing the size
    of held-out rows x vocabulary is kept, whatever the vocabulary.
    """

    def __init__(self, store, positions, settings: DistillSettings, teacher):
        from .training import collate

        records = [store[int(i)] for i in positions]
        self.batches = [
            collate(records[i : i + settings.batch_size], max_length=settings.max_length)
            for i in range(0, len(records), settings.batch_size)
        ]
        self.teacher = teacher
        self.num_samples = len(records)
        self.num_tokens = int(sum(b["kd_mask"].sum() for b in self.batches))
        nll = sum(self._nll(self._logprobs(teacher, b), b) for b in self.batches)
        self.teacher_perplexity = math.exp(nll / self.num_tokens)

    @staticmethod
    def _logprobs(model, batch):
        import torch

        with torch.inference_mode():
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
        return torch.log_softmax(logits[batch["kd_mask"]].double(), dim=-1)

    @staticmethod
    def _nll(logprobs, batch) -> float:
        labels = batch["labels"][batch["kd_mask"]]
        return -float(logprobs.gather(1, labels[:, None]).sum())

    def score(self, model, with_kl: bool) -> dict:
        """Perplexity on the next tokens, and the mean KL(teacher || model) per token."""
        was_training = model.training
        model.eval()
        nll, kl = 0.0, 0.0
        for batch in self.batches:
            student = self._logprobs(model, batch)
            nll += self._nll(student, batch)
            if with_kl:
                teacher = self._logprobs(self.teacher, batch)
                kl += float((teacher.exp() * (teacher - student)).sum())
        model.train(was_training)
        out = {"perplexity": math.exp(nll / self.num_tokens)}
        if with_kl:
            out["kl_to_teacher"] = kl / self.num_tokens
        return out


def run_distill(settings: DistillSettings, students=("kd_ce", "ce_only")) -> dict:
    """Train the named students (``kd_ce``, ``ce_only``) and score them on the held-out ids."""
    from .store.reader import LogitStore

    check_settings(settings)
    with LogitStore(settings.store_dir) as store:
        return _run(store, settings, students)


def _run(store, settings: DistillSettings, students) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, settings.threads))
    if settings.tail in ("auto", "bucket") and "kd_ce" in students:
        if not any(math.isclose(settings.temperature, t) for t in store.temperatures):
            raise ConfigError(
                f"distill.temperature={settings.temperature}: the store has a logsumexp at "
                f"{store.temperatures} only; add it to generation.temperatures and run the "
                "workflow again, or use one of those"
            )
    held = holdout_mask(store.sample_ids, settings.holdout_fraction)
    if held.all() or not held.any():
        raise ConfigError(
            f"distill.holdout_fraction={settings.holdout_fraction} leaves "
            f"{'no training' if held.all() else 'no held-out'} samples among {len(store)}; "
            "use a value between 0.01 and 0.5"
        )
    teacher = AutoModelForCausalLM.from_pretrained(settings.teacher_path, dtype=torch.float32)
    teacher.eval()
    heldout = HeldOut(store, np.flatnonzero(held), settings, teacher)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "train_samples": int((~held).sum()),
        "heldout_samples": heldout.num_samples,
        "heldout_tokens": heldout.num_tokens,
        "teacher": {"perplexity": heldout.teacher_perplexity},
        "students": {},
    }
    for name in students:
        curve = []

        def probe(model, step, curve=curve, name=name):
            curve.append({"step": step, **heldout.score(model, with_kl=False)})
            log.info("%s step %d: held-out perplexity %.2f", name, step, curve[-1]["perplexity"])

        start = time.time()
        model = train_student(store, np.flatnonzero(~held), settings, name == "kd_ce", probe)
        result["students"][name] = {
            **heldout.score(model, with_kl=True),
            "train_seconds": time.time() - start,
            "curve": curve,
        }
    if {"kd_ce", "ce_only"} <= set(result["students"]):
        kd, ce = result["students"]["kd_ce"], result["students"]["ce_only"]
        result["ppl_ratio"] = kd["perplexity"] / ce["perplexity"]
    return result


def check_settings(settings: DistillSettings) -> None:
    if settings.steps < 1 or settings.batch_size < 1:
        raise ConfigError("distill.steps and distill.batch_size must be at least 1")
    if settings.max_length < 2:
        raise ConfigError("distill.max_length must be at least 2 (a row predicts the next token)")
    if not 0.0 <= settings.ce_weight <= 1.0:
        raise ConfigError(f"distill.ce_weight={settings.ce_weight}: use a value in [0, 1]")


def draw_figure(result: dict, path) -> None:
    """Held-out perplexity over the steps for both students, and their final KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"kd_ce": "KD + CE (from the store)", "ce_only": "CE only"}
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(2, 1))
    for name, student in result["students"].items():
        steps = [point["step"] for point in student["curve"]]
        ppl = [point["perplexity"] for point in student["curve"]]
        curves.plot(steps, ppl, marker="o", label=labels.get(name, name))
    curves.axhline(result["teacher"]["perplexity"], color="grey", ls="--", label="teacher")
    curves.set(xlabel="training step", ylabel="held-out perplexity", yscale="log")
    curves.set_title(f"{result['heldout_samples']} held-out samples")
    curves.legend()
    names = list(result["students"])
    bars.bar(
        [labels.get(n, n) for n in names],
        [result["students"][n]["kl_to_teacher"] for n in names],
        color=["C0", "C1"][: len(names)],
    )
    bars.set(ylabel="KL(teacher || student), nats/token")
    bars.set_title("full-vocabulary KL to the teacher")
    bars.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
