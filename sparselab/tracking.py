"""MLflow layout (README, "Tracking"): one experiment per matrix, a parent run per invocation, a child per cell.

Everything goes through one `MlflowClient` in the driver process, so a SQLite store never sees two
writers; a team points MLFLOW_TRACKING_URI at an `mlflow server` instead (see tracking/).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sparselab.errors import UserError

AFFECTS_RESULTS = False  # plans or reports only: sparselab.provenance leaves it out

log = logging.getLogger("sparselab")

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
ARTIFACT_ROOT = Path("mlruns") / "artifacts"
PACKAGES = ("sparselab", "torch", "transformers", "peft", "lm_eval", "mlflow", "datasets")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


# How long `connect` waits for an http(s) tracking server before giving up (attempts x timeout).
SERVER_ATTEMPTS = 3
SERVER_TIMEOUT_S = 5.0


def _store_problem(uri: str, problem: str) -> UserError:
    return UserError(f"tracking store {uri}: {problem} Set MLFLOW_TRACKING_URI to "
                     f"sqlite:///path/to/mlflow.db (a writable folder; the default is "
                     f"{DEFAULT_URI}) or to a running `mlflow server` (http://host:port; see "
                     "tracking/).", key="MLFLOW_TRACKING_URI")


def _client():
    """A client of a checked store, before any model work: a SQLite file is created and its
    schema migrated under a file lock (two first runs on a new store must not both migrate it);
    an http(s) server must answer its health check within a bounded wait; a file store or an
    unreachable database is refused with exit code 2 and one message, not a traceback."""
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = tracking_uri()
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise _store_problem(uri, "MLflow 3 no longer writes to a folder (file) store.")
    if scheme in ("http", "https"):
        _retry(uri, lambda: _health(uri))
    elif scheme.startswith(("postgresql", "mysql")):
        _retry(uri, lambda: _database(uri))
    mlflow.set_tracking_uri(uri)
    with _sqlite_lock(uri) if scheme == "sqlite" else nullcontext():
        try:  # the client opens (and creates or upgrades) the store; one query proves it answers
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as exc:  # MLflow raises many kinds here; each becomes one message
            first_line = (str(exc).splitlines() or [""])[0][:300]
            raise _store_problem(uri, f"it cannot be opened ({type(exc).__name__}: "
                                      f"{first_line}).") from None
    return client


@contextmanager
def _sqlite_lock(uri: str):
    """An exclusive lock beside the SQLite file while the store is opened and migrated (the
    stage cache's kind of lock)."""
    from filelock import FileLock
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(path.name + ".lock")))
        lock.acquire()
    except OSError as exc:
        raise _store_problem(uri, f"its folder {path.parent} cannot be written "
                                  f"({exc.strerror}).") from None
    try:
        yield
    finally:
        lock.release()


def _health(uri: str) -> str | None:
    """None when the server's /health answers; else what went wrong ('!' first: do not retry)."""
    import urllib.error
    import urllib.request
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=SERVER_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as exc:
        return ("!" if exc.code < 500 else "") + f"HTTP {exc.code} from {health}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def _database(uri: str) -> str | None:
    """None when the database accepts a connection within SERVER_TIMEOUT_S; else the error."""
    import sqlalchemy
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args={"connect_timeout": int(SERVER_TIMEOUT_S)})
        with engine.connect():
            return None
    except Exception as exc:  # drivers raise their own kinds
        return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _retry(uri: str, probe) -> None:
    """`probe` up to SERVER_ATTEMPTS times, SERVER_TIMEOUT_S apart, saying what it waits for."""
    for attempt in range(1, SERVER_ATTEMPTS + 1):
        problem = probe()
        if problem is None:
            return
        if problem.startswith("!"):  # it answered: waiting will not change the answer
            problem = problem[1:]
            break
        if attempt < SERVER_ATTEMPTS:
            log.warning("waiting for the tracking store %s (%s; attempt %d of %d)", uri,
                        problem, attempt, SERVER_ATTEMPTS)
            time.sleep(SERVER_TIMEOUT_S)
    raise _store_problem(uri, f"it does not answer ({problem}) after {attempt} "
                              f"tr{'y' if attempt == 1 else 'ies'} of {SERVER_TIMEOUT_S:g} s.")


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


# MLflow's search syntax reads `params.x` as a parameter, so metrics named `params.*` could not be
# filtered on: they are `weights.*`. Runs and cache entries from before the rename read as the new.
RENAMED_METRICS = {f"params.{old}": f"weights.{old}" for old in (
    "total", "nonzero", "total_before", "total_after", "removed", "removed_share")}
# A metric's standard error is a tag of its run, not a metric of its own: the UI's chart view
# would draw each as a one-point chart beside the metric it qualifies.
STDERR_TAG = "sparselab.stderr."
LATEST_TAG = "sparselab.latest"
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; training runs
# belong in the runs table with their params and metrics.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def current_names(metrics: dict[str, float]) -> dict[str, float]:
    return {RENAMED_METRICS.get(name, name): value for name, value in metrics.items()}


def split_stderr(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """(the metrics without their `_stderr` companions, those as `sparselab.stderr.<metric>` tags)."""
    values = {k: v for k, v in metrics.items() if not k.endswith("_stderr")}
    tags = {STDERR_TAG + k[: -len("_stderr")]: repr(float(v)) for k, v in metrics.items()
            if k.endswith("_stderr")}
    return values, tags


def run_metrics(run) -> dict[str, float]:
    """A run's metrics under today's names, with the standard errors (tags, or metrics in runs
    logged before they moved) as `<metric>_stderr`."""
    metrics = current_names(dict(run.data.metrics))
    for tag, value in run.data.tags.items():
        if tag.startswith(STDERR_TAG):
            name = tag[len(STDERR_TAG):]
            metrics[RENAMED_METRICS.get(name, name) + "_stderr"] = float(value)
    return metrics


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
            reconcile(self.client, self.experiment_id)
        if found is None or found.tags.get(KIND_TAG) != KIND:
            self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND)

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        from sparselab.cache import process_identity
        tags = {**tags, **{f"sparselab.owner.{k}": str(v if v is not None else "")
                           for k, v in process_identity().items()}}
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

    def mark_latest(self, runs: dict[str, str]) -> None:
        """Make each run (cell id -> run id: `name`, or `name#i` for replicate i) the one `tags.sparselab.latest = 'true'` finds for
        its cell: one filter in the UI shows every cell's current result (its newest finished
        run, or the earlier run a skipped cell reuses; stores older than the tag get it as cells
        are met). One search for all of them."""
        if not runs:
            return
        older = self.client.search_runs([self.experiment_id],
                                        filter_string=f"tags.`{LATEST_TAG}` = 'true'",
                                        max_results=5000)
        for run in older:  # compared here: a cell name may hold any character
            cell = cell_id(run.data.tags)
            if cell in runs and run.info.run_id != runs[cell]:
                self.client.set_tag(run.info.run_id, LATEST_TAG, "false")
        marked = {run.info.run_id for run in older}
        for run_id in runs.values():
            if run_id not in marked:
                self.client.set_tag(run_id, LATEST_TAG, "true")

    def finished_cell(self, cell_hash: str) -> str | None:
        """The id of a FINISHED child run with this cell hash, if one exists."""
        return finished_run(self.client, self.experiment_id, cell_hash)


def cell_id(tags: dict[str, str]) -> str | None:
    """A run's cell as `Cell.id` names it: the cell, and `#i` for replicate i."""
    cell, replicate = tags.get("sparselab.cell"), tags.get("sparselab.replicate")
    return cell if cell is None or replicate is None else f"{cell}#{replicate}"


def finished_run(client, experiment_id: str, cell_hash: str) -> str | None:
    """The newest FINISHED child run with this cell hash in the experiment, if there is one."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`sparselab.cell_hash` = '{cell_hash}' "
                      "and attributes.status = 'FINISHED'",
        max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def reconcile(client, experiment_id: str) -> list[str]:
    """Mark KILLED (with a note) the RUNNING runs whose owner process on this host is gone: a
    run killed with SIGKILL, or on a machine that lost power, cannot close its runs itself.
    Runs owned on other hosts are left alone (whether their owner lives cannot be seen here)."""
    from sparselab.cache import owner_alive, process_identity
    me = process_identity()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=5000):
        tags = run.data.tags
        owner = {k: tags.get(f"sparselab.owner.{k}") or None for k in ("host", "pid", "pid_start")}
        if owner_alive(owner) is False:
            client.set_tag(run.info.run_id, "sparselab.note",
                           f"its process (pid {owner['pid']} on {owner['host']}) ended without "
                           f"closing the run; marked KILLED by pid {me['pid']} at "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d run(s) KILLED whose process had died while they ran", len(closed))
    return closed


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]
