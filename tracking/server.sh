#!/usr/bin/env bash
# Start an MLflow tracking server for sparselab on 127.0.0.1.
#   tracking/server.sh                 # SQLite store mlruns/mlflow.db, artifacts in mlruns/artifacts
#   BACKEND=postgresql://user:pw@127.0.0.1:5432/mlflow ARTIFACTS=/shared/mlartifacts tracking/server.sh
# Then, in every shell that runs sparselab:  export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT:-5000}
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-5000}"
HOST="${HOST:-127.0.0.1}"
BACKEND="${BACKEND:-sqlite:///mlruns/mlflow.db}"
ARTIFACTS="${ARTIFACTS:-mlruns/artifacts}"
mkdir -p mlruns "$ARTIFACTS"
exec python -m mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts --host "$HOST" --port "$PORT"
