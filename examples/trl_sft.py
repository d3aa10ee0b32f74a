"""Train a student with TRL's SFTTrainer (trl 1.16.0) on a gathered store.

    python examples/trl_sft.py results/demo --out students/trl
    python examples/trl_sft.py /data/store --student path/to/model --holdout 0.02

SFTTrainer takes a ``datasets.Dataset``: here one column of sample ids, so nothing of
the store is copied. The collator reads each batch's records from the store and pads
them with ``collate``; ``compute_loss`` is ``kd_loss``. Batches are SFTTrainer's
(``per_device_train_batch_size`` random samples), and with gradient accumulation the
step's loss is the mean of its micro-batches' means: KDTrainer
(examples/hf_trainer.py) batches by token budget and weighs accumulated rows exactly.
Without --student it trains a small Llama (2 layers, width 64) from scratch.
"""

import argparse
import functools

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, set_seed
from trl import SFTConfig, SFTTrainer

from teacher_logits import LogitStore
from teacher_logits.layout import RunLayout
from teacher_logits.training import check_tokenizer, collate, kd_loss


class KDSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is ``kd_loss`` (``kd``: its keyword arguments)."""

    # The loss is a mean per micro-batch: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, kd: dict, **kwargs):
        self.kd = kd
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # collate's labels are already shifted: the model must not see them.
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        loss = kd_loss(outputs.logits, inputs, **self.kd)
        return (loss, outputs) if return_outputs else loss


def read_and_collate(store, rows, max_length=None):
    return collate([store.by_sample_id(row["sample_id"]) for row in rows], max_length=max_length)


def make_trainer(store, *, holdout, student, tokenizer, args, kd, max_length=None):
    """A ``KDSFTTrainer`` on ``store.split(holdout)``: train and held-out sample ids."""
    train, held_out = store.split(holdout, seed=0)  # distill's holdout rule
    return KDSFTTrainer(
        model=student,
        args=args,
        processing_class=tokenizer,
        data_collator=functools.partial(read_and_collate, store, max_length=max_length),
        train_dataset=Dataset.from_dict({"sample_id": train.sample_ids.tolist()}),
        eval_dataset=Dataset.from_dict({"sample_id": held_out.sample_ids.tolist()}),
        kd=kd,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("store")
    parser.add_argument("--student", help="a Hugging Face causal LM directory to start from")
    parser.add_argument("--out", default="students/trl_sft")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--holdout", type=float, default=0.05)
    args = parser.parse_args(argv)

    store = LogitStore(args.store)
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.student or RunLayout(store.root).tokenizer_dir)
    if args.student:
        check_tokenizer(store, args.student)  # the store's ids must mean the same tokens
        student = AutoModelForCausalLM.from_pretrained(args.student)
    else:
        shape = dict(hidden_size=64, intermediate_size=170, num_hidden_layers=2)
        config = LlamaConfig(vocab_size=store.vocab_size, num_attention_heads=4, **shape)
        student = AutoModelForCausalLM.from_config(config)
    trainer = make_trainer(
        store,
        holdout=args.holdout,
        student=student,
        tokenizer=tokenizer,
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            prediction_loss_only=True,  # evaluation keeps the loss, not every batch's logits
            remove_unused_columns=False,  # the collator needs the sample_id column
            dataset_kwargs={"skip_prepare_dataset": True},  # the store is already tokenized
        ),
        kd=dict(temperature=1.0, tail="bucket", ce_weight=0.5),
        max_length=128,
    )
    trainer.train()
    print(trainer.evaluate())  # eval_loss: kd_loss on the held-out samples
    trainer.save_model(args.out)


if __name__ == "__main__":
    main()
