#!/usr/bin/env bash
# The GPU checks, for a session that has the device tool.
#
#   bash benchmarks/gpu_check.sh            the speed stage's kernels (issue #22): 2:4
#                                           semi-structured, CSR and BSR against dense, through
#                                           sparselab.evaluate.speed (~5 min on an H200)
#   bash benchmarks/gpu_check.sh scale      the memory plan at 8B (issue #24): each stage's
#                                           measured peak against its prediction, resident and
#                                           --onload (benchmarks/scale.py measure --gpu); needs
#                                           pydantic there: run benchmarks/gpu_wheels.sh here
#                                           first and name .whl in the call's carry
#
# Each is one `run` call (timeout_s 600). The machine's python3 holds CUDA torch, transformers,
# peft and accelerate.
#
# It writes $OUT/gpu_check.md when $OUT is set (the device tool brings it back), else
# benchmarks/results/gpu_check.md; commit that file with the command that made it.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [ "${1:-kernels}" = scale ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  PYTHONUNBUFFERED=1 python3 benchmarks/scale.py measure --gpu \
    --out "${OUT:-benchmarks/results}/scale_gpu.md"
else
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}/gpu_check.md"
fi
