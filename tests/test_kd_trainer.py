"""KDTrainer (a transformers Trainer) on a real store (tests/data/store_v2: 6 samples in
2 shards, vocabulary 2048) with a 1-layer Llama of width 32: its loss falls with
Trainer's defaults; accumulated micro-batches give the gradient of their union; a
resumed checkpoint continues the same batches; 2 torchrun ranks (gloo) read disjoint
batches of equal count (about 7 s). The examples: TRL's SFTTrainer with collate and
kd_loss (examples/trl_sft.py) trains; examples/hf_trainer.py evaluates and saves."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from teacher_logits import LogitStore
from teacher_logits.errors import TrainingInputError

from conftest import REPO

pytest.importorskip("transformers")

STORE_V2 = Path(__file__).parent / "data" / "store_v2"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_trainer") / "store"
    shutil.copytree(STORE_V2, root)
    with LogitStore(root) as opened:
        yield opened


def tiny_student(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def arguments(out, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        learning_rate=3e-3,
        logging_steps=5,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def trainer_class():
    from teacher_logits.training import KDTrainer

    class Recording(KDTrainer):
        """Notes (optimizer step, sample ids) of every training micro-batch."""

        seen: list

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.seen.append((self.state.global_step, inputs["sample_id"].tolist()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def make_trainer(store, out, kd=None, seed=0, **overrides):
    from teacher_logits.training import KDConfig

    trainer = trainer_class()(
        model=tiny_student(store.vocab_size, seed),
        args=arguments(out, **overrides),
        train_dataset=store,
        eval_dataset=store.select(store.sample_ids[:2]),
        kd=kd or KDConfig(max_tokens=48),
    )
    trainer.seen = []
    return trainer


def test_kd_trainer_trains_with_trainer_defaults_and_its_loss_falls(tmp_path, store):
    trainer = make_trainer(store, tmp_path / "out", max_steps=30)
    assert trainer.args.remove_unused_columns  # Trainer's default, left as it is
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6 and all({"kd_loss", "ce_loss"} <= set(entry) for entry in logs)
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    # The logged loss (Trainer's mean over steps) is about the mix of the parts (means
    # over the window's rows: steps of unequal rows weigh differently).
    mix = 0.5 * logs[-1]["kd_loss"] + 0.5 * logs[-1]["ce_loss"]
    assert logs[-1]["loss"] == pytest.approx(mix, rel=0.05)
    for key in ("eval_loss", "eval_perplexity", "eval_kl"):
        assert after[key] < before[key]
    assert before["eval_perplexity"] == pytest.approx(
        torch.tensor(2 * before["eval_loss"] - before["eval_kl"]).exp().item(), rel=1e-5
    )
    assert after["eval_tokens"] == sum(int(n) - 1 for n in store.sample_length[:2])
    # Batches come from the token-budget sampler: every sample once per epoch.
    per_epoch = len(trainer._train_sampler)
    first_epoch = [i for _, ids in trainer.seen[:per_epoch] for i in ids]
    assert sorted(first_epoch) == sorted(int(i) for i in store.sample_ids)


def test_kd_trainer_refuses_what_is_not_a_store_in_one_line(tmp_path, store):
    from teacher_logits.training import KDTrainer

    with pytest.raises(TrainingInputError) as error:
        KDTrainer(
            model=tiny_student(store.vocab_size),
            args=arguments(tmp_path),
            train_dataset=[store[0], store[1]],
        )
    message = str(error.value)
    assert "\n" not in message and "train_dataset is a list" in message and "store.split" in message


def test_accumulated_micro_batches_give_the_gradient_of_their_union(tmp_path, store):
    from teacher_logits.training import KDConfig, collate, kd_loss

    kd = KDConfig(max_tokens=24, ce_weight=0.3)  # one sample per micro-batch
    trainer = make_trainer(store, tmp_path / "out", kd=kd, gradient_accumulation_steps=3)
    model = trainer.model
    loader = trainer.get_train_dataloader()
    micro, rows = trainer.get_batch_samples(iter(loader), 3, trainer.args.device)
    sizes = [int(b["kd_mask"].sum()) for b in micro]
    assert int(rows) == sum(sizes) and len(set(sizes)) > 1  # unequal rows: means differ
    for batch in micro:
        trainer.training_step(model, batch, rows)
    accumulated = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    union = collate([store.by_sample_id(i) for b in micro for i in b["sample_id"].tolist()])
    logits = model(input_ids=union["input_ids"], attention_mask=union["attention_mask"]).logits
    kd_loss(logits, union, temperature=1.0, tail="bucket", ce_weight=0.3).backward()
    for mine, theirs in zip(accumulated, (p.grad for p in model.parameters())):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max())

    # What a mean per micro-batch divided by the step count would give instead.
    model.zero_grad()
    for batch in micro:
        (trainer.compute_loss(model, batch) / 3).backward()
    naive = [p.grad for p in model.parameters()]
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(accumulated, naive))


def test_a_resumed_checkpoint_continues_the_same_batches(tmp_path, store):
    from teacher_logits.training import KDConfig

    kd = KDConfig(max_tokens=24)  # 6 batches an epoch, 3 optimizer steps
    settings = dict(max_steps=8, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)
    full = make_trainer(store, tmp_path / "full", kd=kd, **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"  # epoch 1, 2 of its 6 batches done
    state = json.loads((checkpoint / "kd_sampler.json").read_text())
    assert (state["epoch"], state["batches_done"], state["max_tokens"]) == (1, 2, 24)

    resumed = make_trainer(store, tmp_path / "full", kd=kd, seed=1, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = [ids for step, ids in full.seen if step >= 4]
    assert len(after) == 8  # 4 steps of 2 micro-batches, over the end of epoch 1
    assert [ids for _, ids in resumed.seen] == after

    other = make_trainer(store, tmp_path / "full", kd=KDConfig(max_tokens=48), **settings)
    with pytest.raises(TrainingInputError) as error:
        other.train(resume_from_checkpoint=str(checkpoint))
    assert "\n" not in str(error.value) and "max_tokens=24 (this sampler: 48)" in str(error.value)


TORCHRUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[3])
from test_kd_trainer import make_trainer
from teacher_logits import LogitStore
from teacher_logits.training import KDConfig

store = LogitStore(sys.argv[1])
trainer = make_trainer(store, sys.argv[2], kd=KDConfig(max_tokens=24), num_train_epochs=2,
                       ddp_backend="gloo", logging_steps=1)
trainer.train()
metrics = trainer.evaluate()
out = os.path.join(sys.argv[2], f"rank{trainer.args.process_index}.json")
with open(out, "w") as handle:
    json.dump({"seen": trainer.seen, "world": trainer.args.world_size, "eval": metrics}, handle)
"""


def test_two_torchrun_ranks_read_disjoint_batches_of_equal_count(tmp_path, store):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(store.root), str(tmp_path)]
        + [str(REPO / "tests")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    per_rank = [[ids for _, ids in r["seen"]] for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # 3 batches an epoch each, 2 epochs
    for epoch in (0, 1):
        mine = [set(i for ids in p[3 * epoch : 3 * epoch + 3] for i in ids) for p in per_rank]
        assert not mine[0] & mine[1]
        assert mine[0] | mine[1] == {int(i) for i in store.sample_ids}
    # Every rank reports the metrics of the whole held-out set.
    assert ranks[0]["eval"] == ranks[1]["eval"]
    assert ranks[0]["eval"]["eval_tokens"] == sum(int(n) - 1 for n in store.sample_length[:2])


def test_the_training_package_imports_transformers_only_for_kd_trainer():
    code = (
        "import sys\n"
        "import teacher_logits.training as training\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), 'eager'\n"
        "training.KDConfig\n"
        "assert 'transformers' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def load_example(name: str):
    """An example script as a module (its main() is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_sft_trainer_trains_a_student_with_collate_and_kd_loss(tmp_path, store):
    pytest.importorskip("trl")
    from trl import SFTConfig

    from teacher_logits.demo import build_tokenizer

    example = load_example("trl_sft")
    tokenizer = build_tokenizer(["the apple river stone"] * 20, vocab_size=300)
    student = tiny_student(store.vocab_size)
    before = [p.detach().clone() for p in student.parameters()]
    config = SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        max_steps=12,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    kd = dict(temperature=1.0, tail="bucket", ce_weight=0.5)
    trainer = example.make_trainer(
        store, holdout=0.5, student=student, tokenizer=tokenizer, args=config, kd=kd
    )
    assert len(trainer.eval_dataset) and len(trainer.train_dataset) + len(trainer.eval_dataset) == 6
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert trainer.evaluate()["eval_loss"] < first
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_the_hf_trainer_example_evaluates_and_saves_the_student(tmp_path, store):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    command = [sys.executable, str(REPO / "examples" / "hf_trainer.py"), str(store.root)]
    command += ["--out", str(out), "--steps", "4", "--holdout", "0.5"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert metrics["eval_tokens"] > 0 and math.isfinite(metrics["eval_perplexity"])
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.vocab_size == store.vocab_size
