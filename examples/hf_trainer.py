"""Train a student with KDTrainer (a Hugging Face Trainer) on a gathered store.

    python examples/hf_trainer.py results/demo --out students/kd            # KD + CE
    python examples/hf_trainer.py results/demo --out students/ce --ce-weight 1.0
    torchrun --nproc-per-node 8 examples/hf_trainer.py /data/store --student path/to/model

Without --student it trains a small Llama (2 layers, width 64) from scratch.
"""

import argparse

from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments, set_seed

from teacher_logits import LogitStore
from teacher_logits.training import KDConfig, KDTrainer, check_tokenizer

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("store")
parser.add_argument("--student", help="a Hugging Face causal LM directory to start from")
parser.add_argument("--out", default="students/hf_trainer")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--ce-weight", type=float, default=0.5)
parser.add_argument("--holdout", type=float, default=0.05, help="held-out share of samples")
args = parser.parse_args()

train, held_out = LogitStore(args.store).split(args.holdout, seed=0)  # distill's holdout rule
set_seed(0)
if args.student:
    check_tokenizer(train, args.student)  # the store's ids must mean the same tokens
    student = AutoModelForCausalLM.from_pretrained(args.student)
else:
    shape = dict(hidden_size=64, intermediate_size=170, num_hidden_layers=2, num_attention_heads=4)
    student = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=train.vocab_size, **shape))
trainer = KDTrainer(
    model=student,
    args=TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        learning_rate=3e-3,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=0,
    ),
    train_dataset=train,
    eval_dataset=held_out,
    kd=KDConfig(ce_weight=args.ce_weight, max_tokens=512, max_length=128),  # T=1, bucket tail
)
trainer.train()
print(trainer.evaluate())  # eval_loss, eval_perplexity (held out), eval_kl (to the teacher)
trainer.save_model(args.out)
