#!/usr/bin/env bash
# First contact with a GPU, in one command and one table (README: GPU check): throughput, MFU and memory of
# Qwen3-0.6B in bf16 on both engines, eager and Inductor, the attention kernels, fp32's TF32, checkpoints
# across devices, Apex where it imports, `pytest -m gpu` and the CPU suite. Under 8 minutes on one H100.
#   scripts/gpu_check.sh [--device cpu] [--iters N] [--no-suite] [--out DIR]
# Without CUDA the same rows run a tiny model (CI runs it so), and the rows that need CUDA say so.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m anneal.bench.gpu_check "$@"
