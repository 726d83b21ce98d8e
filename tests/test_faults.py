"""Faults: the tracking store checked before any model work, and opened safely by two runners."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from sparselab.cli import main

from conftest import REPO, write
from test_bad_input import GOOD

OPEN_STORE = "from sparselab.tracking import Tracker; Tracker('race')"


@pytest.mark.parametrize("attempt", range(2))
def test_first_runs_on_a_new_sqlite_store_do_not_race(tmp_path, attempt):
    """Three processes open one new SQLite store at once: the schema is created once, under a
    lock (without it MLflow's migration crashes one of them, or leaves the store unusable)."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/new/mlflow.db", "PYTHONPATH": str(REPO),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)[-3000:]
    again = subprocess.run([sys.executable, "-c", OPEN_STORE], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]  # and the store stays usable


@pytest.mark.parametrize("uri,message", [
    ("file:///{tmp}/folder-store", "no longer writes to a folder (file) store"),
    ("sqlite:////proc/no/such/dir/mlflow.db", "cannot be written"),
    ("http://127.0.0.1:9", "does not answer"),
])
def test_tracking_store_problems_are_one_message_before_any_work(workspace, monkeypatch, uri,
                                                                 message):
    import sparselab.tracking as tracking
    monkeypatch.setattr(tracking, "SERVER_ATTEMPTS", 2)
    monkeypatch.setattr(tracking, "SERVER_TIMEOUT_S", 0.1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=workspace))
    path = write(workspace / "m.yaml", GOOD)
    result = CliRunner().invoke(main, ["run", str(path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in text and "MLFLOW_TRACKING_URI" in text
    assert not (workspace / "home").exists()  # no stage was computed
