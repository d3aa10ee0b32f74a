"""Train a student on a gathered store: the loop a user pastes into their own trainer.

    python examples/train_student.py results/demo --student path/to/student_model
    python examples/train_student.py results/demo --tiny      # a 2-layer Llama from scratch
    torchrun --nproc-per-node 8 examples/train_student.py /data/store --student ...

Works against any store: it reads the vocabulary and the teacher's tokenizer from
the store, checks the student's tokenizer against it, and under torchrun each rank
reads its own shards (``ShardLocalBatchSampler``) and averages gradients with DDP.
It holds out ``--holdout`` of the samples (``store.split``, the rule ``snakemake
distill`` uses), reports their perplexity and KL to the teacher every
``--eval-every`` steps and at the end, and saves the student with its tokenizer
(``save_pretrained``) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os

import torch
from torch.utils.data import DataLoader

from teacher_logits import LogitStore
from teacher_logits.layout import RunLayout
from teacher_logits.training import ShardLocalBatchSampler, check_tokenizer, collate, kd_loss


def build_student(args, store):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if args.tiny:
        if store.vocab_size is None:
            raise SystemExit(
                f"{args.store} records no vocab_size: gather it again, or use --student"
            )
        config = LlamaConfig(
            vocab_size=store.vocab_size,
            hidden_size=64,
            intermediate_size=170,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.max_length,
            tie_word_embeddings=True,
        )
        return AutoModelForCausalLM.from_config(config)
    # The stored ids index the teacher's vocabulary: the student must share it.
    check_tokenizer(store, AutoTokenizer.from_pretrained(args.student))
    return AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, held_out, args, device) -> dict:
    """Held-out perplexity (exp of the cross-entropy per token) and KL to the teacher,
    per kd_mask row over the whole held-out part."""
    sampler = ShardLocalBatchSampler(
        held_out, max_tokens=args.max_tokens, max_length=args.max_length
    )
    loader = DataLoader(
        held_out,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, max_length=args.max_length),
    )
    was_training, sums = model.training, torch.zeros(3, dtype=torch.float64)
    model.eval()
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        rows = batch["kd_mask"].sum().item()
        ce = kd_loss(logits, batch, ce_weight=1.0).item()
        kl = kd_loss(logits, batch, temperature=args.temperature, tail="bucket").item()
        sums += torch.tensor([ce * rows, kl * rows, rows], dtype=torch.float64)
    model.train(was_training)
    rows = max(sums[2].item(), 1.0)
    return {"perplexity": math.exp(sums[0].item() / rows), "kl": sums[1].item() / rows}


def save(model, store, args) -> None:
    """The student and its tokenizer (the student's own, or the teacher's copy in the store)."""
    from transformers import AutoTokenizer

    model.save_pretrained(args.out)
    tokenizer_dir = args.student or RunLayout(store.root).tokenizer_dir
    if os.path.isdir(tokenizer_dir):  # stores gathered before the copy existed have none
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(args.out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("store", help="the workflow's output_dir (or its index.h5)")
    parser.add_argument("--student", help="a Hugging Face causal LM directory")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama from scratch")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch")
    parser.add_argument("--max-length", type=int, default=2048, help="crop samples to this")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--holdout", type=float, default=0.05, help="fraction held out")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", default="students/train_student", help="save the student here")
    args = parser.parse_args(argv)
    if not (args.student or args.tiny):
        parser.error("give --student PATH or --tiny")

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(
        f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    )

    store = LogitStore(args.store)
    train, held_out = store.split(args.holdout, seed=0)
    model = build_student(args, store).to(device)
    plain = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # Every rank gets the same number of batches, each read from its own shards.
    sampler = ShardLocalBatchSampler(
        train,
        max_tokens=args.max_tokens,
        rank=rank,
        world_size=world,
        seed=0,
        max_length=args.max_length,
    )
    loader = DataLoader(
        train,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, max_length=args.max_length),
        num_workers=args.workers,
    )
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
            # Row t of the logits is compared with the teacher's row t (its next-token
            # distribution) and with labels[t] = input_ids[t + 1]; collate did the shift.
            loss = kd_loss(
                logits, batch, temperature=args.temperature, tail="bucket", ce_weight=args.ce_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0 and step % 20 == 0:
                print(f"step {step}: loss {loss.item():.4f}", flush=True)
            if rank == 0 and step % args.eval_every == 0 and step < args.steps:
                print(
                    f"step {step}: held out {evaluate(plain, held_out, args, device)}", flush=True
                )
            if step >= args.steps:
                break
        epoch += 1
    # To resume: save sampler.state_dict(batches_done=<batches finished this epoch>) with
    # the model and optimizer, and call sampler.load_state_dict(...) before the loop.
    if rank == 0:
        print(f"step {step}: held out {evaluate(plain, held_out, args, device)}", flush=True)
        save(plain, store, args)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
