#!/usr/bin/env bash
# GPU check, about 5 minutes on one H100/H200: a ~1.1B-parameter random Llama in
# bfloat16, floor (forward + topk + logsumexp) vs the generate job end to end on the
# GPU, the naive script, tokens/s, ratio, model FLOP utilisation, peak GPU memory
# (with and without the KV cache) and the versions it ran with; then, with at least
# 2 GPUs, pipeline vs tensor-parallel tokens/s and peak memory per GPU on the same
# batches (with fewer it says so and skips). Needs torch, transformers, accelerate, h5py, numpy,
# tqdm and pyyaml, not Snakemake: it drives the generation core directly. Without
# hdf5plugin the shard uses lzf (the result says which).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TEACHER_LOGITS_GPU_LOCK_DIR=/tmp/gpu_check_locks
python3 bench/bench_generate.py --device cuda --quick --work "${GPU_CHECK_WORK:-/tmp/gpu_check}" "$@"
# The first 2 GPUs only (with one, CUDA shows one and the bench skips).
CUDA_VISIBLE_DEVICES="${GPU_CHECK_PAIR:-0,1}" python3 bench/bench_parallel.py --device cuda --quick --ranks 2 --work "${GPU_CHECK_WORK:-/tmp/gpu_check}"
