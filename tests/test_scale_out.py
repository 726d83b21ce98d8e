"""Scale-out (#8): the Ray executor against a PostgreSQL-backed MLflow server, and a worker killed
mid-cell. Every process a test starts is stopped by its PID at the end."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("ray", reason="the Ray executor is the optional extra sparselab[ray]")

pytestmark = pytest.mark.slow  # end-to-end: pytest -m 'not slow' leaves these out

SMOKE = str(REPO / "tests" / "matrices" / "smoke.yaml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_isready() -> str:
    found = shutil.which("pg_isready") or next(iter(sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_isready"), reverse=True)), None)
    if found is None:
        pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's 'postgresql' package)")
    return found


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process the test started, by its PID (and the group it leads)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.poll() is not None


def _wait(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} did not come up in {timeout:.0f}s")


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1, started by tracking/postgres.sh (its PID is the
    server's)."""
    data = Path(tempfile.mkdtemp(prefix="sparselab-pg-"))  # the 'postgres' user must reach it
    data.chmod(0o755)
    port = _free_port()
    proc = subprocess.Popen(["bash", str(REPO / "tracking" / "postgres.sh"), str(data / "db")],
                            env={**os.environ, "PGPORT": str(port)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = [_pg_isready(), "-h", "127.0.0.1", "-p", str(port)]

        def up() -> bool:
            assert proc.poll() is None, "tracking/postgres.sh exited"
            return subprocess.run(ready, capture_output=True).returncode == 0
        _wait(up, "PostgreSQL")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop(proc)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on the PostgreSQL store, artifacts on a local ('shared') path."""
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             postgres, "--artifacts-destination", str(tmp_path / "artifacts"),
                             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
        try:
            return urllib.request.urlopen(uri + "/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        _wait(healthy, "mlflow server", timeout=180)
        yield uri
    finally:
        _stop(proc)
        log.close()


def _sparselab(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparselab", *args], env=env,
                          capture_output=True, text=True, timeout=1200, **kwargs)


def _env(home: Path, tracking: str) -> dict[str, str]:
    return {**os.environ, "SPARSELAB_HOME": str(home), "MLFLOW_TRACKING_URI": tracking,
            "RAY_worker_niceness": "0"}


def _cells(tracking: str, experiment: str = "smoke") -> dict[str, object]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`sparselab.cell` != ''")
    return {run.data.tags["sparselab.cell"]: run for run in runs}


def test_ray_on_postgres_server_matches_a_sequential_run(tmp_path, mlflow_server):
    ray_home = tmp_path / "ray-home"
    out = _sparselab("run", SMOKE, "--executor", "ray", "--max-concurrent", "2",
                     env=_env(ray_home, mlflow_server), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    local = f"sqlite:///{tmp_path}/local.db"
    out = _sparselab("run", SMOKE, env=_env(tmp_path / "local-home", local), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    on_ray, sequential = _cells(mlflow_server), _cells(local)
    assert sorted(on_ray) == sorted(sequential) == ["baseline", "dense", "exp1", "exp2", "exp3",
                                                    "exp4"]
    for name, run in on_ray.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["sparselab.executor"] == "ray"
        metrics, expected = _deterministic(run), _deterministic(sequential[name])
        assert metrics and sorted(metrics) == sorted(expected)
        for key, value in metrics.items():
            assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (name, key)
    # Three calibration sets -> three prunes, each computed by one Ray task that its cells share.
    pruned = {run.data.tags["sparselab.stage.prune.key"]: set() for run in on_ray.values()
              if "sparselab.stage.prune.key" in run.data.tags}
    for run in on_ray.values():
        if "sparselab.stage.prune.key" in run.data.tags:
            pruned[run.data.tags["sparselab.stage.prune.key"]].add(
                run.data.tags["sparselab.stage.prune.ray_task_id"])
            assert run.data.tags["sparselab.stage.prune.host"] == socket.gethostname()
            assert run.data.tags["sparselab.stage.recover.device"] == "cpu"
    assert len(pruned) == 3 and all(len(tasks) == 1 for tasks in pruned.values())
    assert len(list((ray_home / "stages" / "prune").iterdir())) == 3
    assert not any((ray_home / "tmp").iterdir())


def test_ray_finishes_cells_whose_stages_are_all_cached(workspace):
    """A cell computed before (same stage cache) but new to this store: no Ray task runs, and
    the cell is still logged FINISHED from the cache, not left RUNNING."""
    home = workspace / "home"
    first = f"sqlite:///{workspace}/first.db"
    out = _sparselab("run", SMOKE, "--only", "baseline", env=_env(home, first), cwd=workspace)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    second = f"sqlite:///{workspace}/second.db"
    out = _sparselab("run", SMOKE, "--only", "baseline", "--executor", "ray",
                     env=_env(home, second), cwd=workspace)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 finished" in " ".join(out.stdout.split()), out.stdout[-3000:]
    cached, before = _cells(second), _cells(first)
    assert sorted(cached) == sorted(before) == ["baseline", "dense"]
    for name, run in cached.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["sparselab.executor"] == "ray"
        assert _deterministic(run) == _deterministic(before[name])


def _deterministic(run) -> dict[str, float]:
    """A run's metrics without timings, speeds and memory, which differ from run to run."""
    return {k: v for k, v in run.data.metrics.items()
            if not k.startswith("time.") and not k.endswith(("_per_s", "_mb"))}


def _kill_first_recover(proc: subprocess.Popen, home: Path) -> str:
    """SIGKILL the process computing the first recover stage to appear; return its key."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        for owner in sorted((home / "tmp").glob("recover-*/owner.json")):
            try:
                pid = json.loads(owner.read_text())["pid"]
            except (OSError, ValueError):
                continue
            os.kill(pid, signal.SIGKILL)
            return owner.parent.name.split("-")[1]
        time.sleep(0.05)
    pytest.fail("no recover stage started")


@pytest.mark.parametrize("retries", [0, 1])
def test_killed_worker_fails_its_cell_or_is_retried(workspace, retries):
    """SIGKILL the worker computing a recover stage: without retries its cell is FAILED and the
    rest finish; with --retries 1 Ray runs the stage again and every cell finishes. Either way the
    cache never holds a partial entry."""
    from sparselab.cache import StageCache
    home = workspace / "home"
    env = _env(home, os.environ["MLFLOW_TRACKING_URI"])
    proc = subprocess.Popen([sys.executable, "-m", "sparselab", "run", SMOKE, "--only",
                             "baseline,exp1", "--executor", "ray", "--max-concurrent", "2",
                             "--retries", str(retries), "--set", "recover.train.max_steps=300"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        killed = _kill_first_recover(proc, home)
        output = proc.communicate(timeout=900)[0]
    finally:
        _stop(proc)
    cells = _cells(os.environ["MLFLOW_TRACKING_URI"])
    cache = StageCache(home)
    victim = next(name for name, run in cells.items()
                  if run.data.tags.get("sparselab.stage.recover.key") == killed)
    others = {name: run.info.status for name, run in cells.items() if name != victim}
    assert others == {"dense": "FINISHED", ({"baseline", "exp1"} - {victim}).pop(): "FINISHED"}
    if retries:
        assert proc.returncode == 0, output[-3000:]
        assert cells[victim].info.status == "FINISHED"
        assert cache.entry("recover", killed) is not None
    else:
        assert proc.returncode == 1, output[-3000:]
        assert cells[victim].info.status == "FAILED"
        assert "died" in cells[victim].data.tags["sparselab.error"]
        assert cache.entry("recover", killed) is None  # no partial entry
    cache.gc()  # the killed attempt's temporary folder: its process is gone
    assert not any((home / "tmp").iterdir())
