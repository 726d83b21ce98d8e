#!/usr/bin/env bash
# The GPU half of the speed stage's check (issue #22): 2:4 semi-structured, CSR and BSR kernels
# against dense on a CUDA GPU, through sparselab.evaluate.speed. For a session that has the device
# tool: its machine's python3 holds CUDA torch and transformers (sparselab's speed code needs
# nothing else), so the command is just
#
#   device run:  bash benchmarks/gpu_check.sh          (timeout_s 600; ~5 min on an H200)
#
# It writes $OUT/gpu_check.md when $OUT is set (the device tool brings it back), else
# benchmarks/results/gpu_check.md; commit that file with the command that made it.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}/gpu_check.md"
