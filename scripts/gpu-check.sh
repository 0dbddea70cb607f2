#!/usr/bin/env bash
# The paths CPU CI cannot reach, on a machine with CUDA GPUs: bf16 autocast, CUDA RNG state,
# pinned async saves, FSDP2 on one GPU and NCCL across GPUs, torch.compile, and a kill -9
# resume bit-exact with deterministic algorithms. One line per check; non-zero exit on a
# failure; without CUDA everything is skipped (exit 0). `--cpu` dry-runs what needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh >/dev/null
exec .venv/bin/python scripts/gpu_check.py "$@"
