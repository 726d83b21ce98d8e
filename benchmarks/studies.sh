#!/usr/bin/env bash
# Run the seed studies (#9) on SmolLM2-135M against the shared data, one after another, and write
# each one's `sparselab report` (Markdown + plot) into docs/results/. Finished cells are skipped on
# a rerun (the stage cache and MLflow make that cheap), so an interrupted study resumes.
#   benchmarks/studies.sh                          # all four, data from ../shared/data
#   DATA_DIR=/data benchmarks/studies.sh recovery block_lora
#   RUN_OPTIONS="--executor ray --max-concurrent 2" benchmarks/studies.sh   # cells side by side
# Wall time, the command and the machine of each invocation go to docs/results/<study>.log.txt.
# The study imports sparselab from this checkout (PYTHONPATH, inherited by Ray's workers), not from
# wherever `pip install -e` points: run it from its own worktree, and editing the working copy while
# it runs cannot hand its workers half-changed code (a lazy import mid-study would see the edit):
#   git worktree add ../study HEAD && SPARSELAB_HOME=$PWD/.sparselab ../study/benchmarks/studies.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA_DIR="${DATA_DIR:-../shared/data}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(recovery block_lora gqa_structured task_specific)
mkdir -p docs/results
for study in "${studies[@]}"; do
  start=$(date +%s)
  status=0
  # shellcheck disable=SC2086  # RUN_OPTIONS is a list of options
  sparselab run "matrix/$study.yaml" --data-dir "$DATA_DIR" ${RUN_OPTIONS:-} || status=$?
  {
    echo "sparselab run matrix/$study.yaml --data-dir $DATA_DIR ${RUN_OPTIONS:-} # exit $status"
    echo "finished $(date -u '+%Y-%m-%d %H:%M UTC') after $(( $(date +%s) - start )) s wall;" \
         "$(getconf _NPROCESSORS_ONLN) CPU cores, OMP_NUM_THREADS=${OMP_NUM_THREADS:-default}," \
         "load average $(cut -d' ' -f1-3 /proc/loadavg)"
  } >> "docs/results/$study.log.txt"
  sparselab report "matrix/$study.yaml" --format md --output "docs/results/$study.md" \
    --plot "docs/results/$study.png"
done
