"""MLflow layout (DESIGN §5): one experiment per matrix, a parent run per invocation, a child per cell.

Everything goes through one `MlflowClient` in the driver process, so a SQLite store never sees two
writers; a team points MLFLOW_TRACKING_URI at an `mlflow server` instead (see tracking/).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
ARTIFACT_ROOT = Path("mlruns") / "artifacts"
PACKAGES = ("sparselab", "torch", "transformers", "peft", "lm_eval", "mlflow", "datasets")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


@functools.cache
def environment_tags() -> dict[str, str]:
    tags = {}
    for package in PACKAGES:
        try:
            tags[f"sparselab.version.{package}"] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


class Tracker:
    def __init__(self, experiment: str):
        self.client = _client()
        self.experiment_name = experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if tracking_uri().startswith("sqlite:"):
                location = (ARTIFACT_ROOT / experiment).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def log_series(self, run_id: str, name: str, values: list[float]) -> None:
        """One metric over steps (train.loss per step)."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, step) for step, v in enumerate(values)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_artifacts(self, run_id: str, folder: Path, path: str | None = None) -> None:
        if folder.is_dir() and any(folder.iterdir()):
            self.client.log_artifacts(run_id, str(folder), artifact_path=path)

    def log_artifact(self, run_id: str, file: Path, path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(file), artifact_path=path)

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def finished_cell(self, cell_hash: str) -> str | None:
        """The id of a FINISHED child run with this cell hash, if one exists."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`sparselab.cell_hash` = '{cell_hash}' "
                          "and attributes.status = 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]
