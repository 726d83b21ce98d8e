"""Faults: the tracking store checked before any model work, and opened safely by two runners."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from sparselab.cli import main

from conftest import REPO, write
from test_bad_input import GOOD

pytestmark = pytest.mark.slow  # end-to-end: pytest -m 'not slow' leaves these out

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


# --- recording is inside each cell's failure isolation ------------------------------------------

def _runs(workspace, experiment="bad"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    runs = sorted(client.search_runs([client.get_experiment_by_name(experiment).experiment_id]),
                  key=lambda r: r.info.start_time)
    children = {r.data.tags["sparselab.cell"]: r for r in runs  # the newest run of each cell
                if "mlflow.parentRunId" in r.data.tags}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, children


def test_a_legacy_entry_that_cannot_be_read_fails_its_cell_and_the_others_run(workspace):
    """An entry from before checksums (no files.json) is read as it is: if it is garbled,
    recording fails that cell alone."""
    path = write(workspace / "m.yaml", GOOD)
    assert CliRunner().invoke(main, ["run", str(path)]).exit_code == 0
    _, children = _runs(workspace)
    entry = (workspace / "home" / "stages" / "perplexity" /
             children["a"].data.tags["sparselab.stage.perplexity.key"])
    (entry / "files.json").unlink()
    (entry / "metrics.json").write_text("{garbled")
    result = CliRunner().invoke(main, ["run", str(path), "--rerun"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    parents, children = _runs(workspace)
    assert parents[-1].info.status == "FAILED"
    assert children["a"].info.status == "FAILED"
    assert "recording the results failed" in children["a"].data.tags["sparselab.error"]
    assert children["b"].info.status == children["dense"].info.status == "FINISHED"


# --- cache entries are verified, not trusted ----------------------------------------------------

def test_damaged_entries_are_set_aside_and_recomputed(workspace):
    path = write(workspace / "m.yaml", GOOD)
    assert CliRunner().invoke(main, ["run", str(path)]).exit_code == 0
    _, children = _runs(workspace)
    clean = children["a"].data.metrics
    stages = workspace / "home" / "stages"
    tags = children["a"].data.tags
    # a garbled small file is caught on every read
    (stages / "perplexity" / tags["sparselab.stage.perplexity.key"] / "metrics.json").write_text(
        "{garbled")
    # zeroed weights (same size) are caught when a stage is about to be computed from them
    weights = next((stages / "prune" / tags["sparselab.stage.prune.key"]).rglob("*.safetensors"))
    with weights.open("r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\0" * 4096)
    result = CliRunner().invoke(main, ["run", str(path), "--rerun", "--only", "a",
                                       "--set", "evaluate.perplexity.max_windows=3"])
    assert result.exit_code == 0, result.output
    assert "is damaged" in result.output
    damaged = sorted(p.name.split("-")[0] for p in (workspace / "home" / "damaged").iterdir())
    assert damaged == ["prune"]  # the new evaluation needed the pruned weights: hashed in full
    result = CliRunner().invoke(main, ["run", str(path), "--rerun", "--only", "a"])
    assert result.exit_code == 0, result.output
    damaged = sorted(p.name.split("-")[0] for p in (workspace / "home" / "damaged").iterdir())
    assert damaged == ["perplexity", "prune"]
    _, children = _runs(workspace)
    again = children["a"].data.metrics
    for name in ("wikitext2.ppl", "wikitext2.ppl_pruned", "sparsity.linear"):
        assert again[name] == clean[name], name  # recomputed, not mixed with corrupt weights
    # cache ls survives a garbled entry; verify finds what is damaged; rm removes by key
    entry = stages / "load" / tags["sparselab.stage.load.key"]
    (entry / "meta.json").write_text("{garbled")
    listed = CliRunner().invoke(main, ["cache", "ls", "--matrix", str(path)])
    assert listed.exit_code == 0 and "damaged" in listed.output
    assert "bad/a" in listed.output and time.strftime("%Y-%m-%d") in listed.output
    verified = CliRunner().invoke(main, ["cache", "verify"])
    assert verified.exit_code == 1 and f"load/{entry.name}" in verified.output
    assert not entry.exists()
    key = tags["sparselab.stage.perplexity.key"]
    assert CliRunner().invoke(main, ["cache", "rm", key[:8]]).exit_code == 0
    assert not (stages / "perplexity" / key).exists()
    gone = CliRunner().invoke(main, ["cache", "rm", "zzzz"])
    assert gone.exit_code == 2 and "matches 0 entries" in gone.output


def test_a_signal_while_recording_marks_the_cell_killed(workspace, monkeypatch):
    from sparselab.tracking import Tracker

    def interrupted(self, run_id, metrics, step=0):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(Tracker, "log_metrics", interrupted)
    result = CliRunner().invoke(main, ["run", str(write(workspace / "m.yaml", GOOD))])
    assert result.exit_code == 130
    parents, children = _runs(workspace)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert [c.info.status for c in children.values()] == ["KILLED"]  # never left RUNNING


def test_an_entry_made_by_another_runner_while_waiting_is_not_computed_again(tmp_path,
                                                                            monkeypatch):
    """The runner that waited on the lock finds the entry: no computation, so a cache hit."""
    import threading

    from sparselab import runner as runner_module
    from sparselab.cache import StageCache
    from sparselab.matrix import expand, load_matrix
    from sparselab.stages import plan_cell
    from sparselab.validate import source_of
    cell = expand(load_matrix(write(tmp_path / "m.yaml", GOOD)))[0]
    plan = plan_cell(cell, source_of(cell))
    stage = plan.model  # the load stage: no parent
    cache = StageCache(tmp_path / "home")
    locked, release = threading.Event(), threading.Event()

    def other_runner():
        with cache.lock(stage.kind.name, stage.key):
            locked.set()
            release.wait(10)
            # another runner of this code: its entry names the same code
            with cache.writing(stage.kind.name, stage.key,
                               {"by": "other", "code": stage.code.record()}):
                pass

    monkeypatch.setattr(type(stage.kind), "compute",
                        lambda *a: pytest.fail("computed an entry another runner made"))
    thread = threading.Thread(target=other_runner)
    thread.start()
    locked.wait(10)
    threading.Timer(0.5, release.set).start()
    runner = runner_module.StageRunner(cache)
    entry = runner.ensure(stage, plan)
    thread.join()
    assert entry.meta["by"] == "other" and stage.key not in runner.computed


# --- what a dead process leaves behind is reconciled by the next command ------------------------

DIES_RUNNING = """
import os
from sparselab.tracking import Tracker
tracker = Tracker("bad")
parent = tracker.start_run("parent", {})
tracker.start_run("a", {"sparselab.cell": "a"}, parent)
os._exit(9)  # as SIGKILL would: no chance to close the runs
"""


def test_runs_of_a_dead_process_are_marked_killed_and_its_leftovers_removed(workspace):
    import json
    import os
    import socket
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    died = subprocess.run([sys.executable, "-c", DIES_RUNNING], env=env, cwd=workspace,
                          capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    parents, children = _runs(workspace)
    assert [r.info.status for r in parents + list(children.values())] == ["RUNNING"] * 2
    leftover = workspace / "home" / "tmp" / "prune-abc-12345678"
    leftover.mkdir(parents=True)
    (leftover / "owner.json").write_text(json.dumps(  # above Linux's pid_max: a dead writer
        {"host": socket.gethostname(), "pid": 2**22 + 1}))
    result = CliRunner().invoke(main, ["run", str(write(workspace / "m.yaml", GOOD)),
                                       "--only", "a"])
    assert result.exit_code == 0, result.output
    parents, children = _runs(workspace)
    dead = [r for r in parents if r.data.tags.get("mlflow.runName") == "parent"][0]
    assert dead.info.status == "KILLED" and "ended without closing" in dead.data.tags["sparselab.note"]
    assert all(r.info.status != "RUNNING" for r in parents + list(children.values()))
    assert not leftover.exists()


# --- the UI stops with everything it started ----------------------------------------------------

def test_ui_stopped_with_sigterm_leaves_no_server_behind(workspace):
    import os
    import signal
    import socket
    import time
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI":
           f"sqlite:///{workspace}/mlflow.db"}
    ui = subprocess.Popen([sys.executable, "-m", "sparselab", "ui", "--port", str(port)],
                          env=env, cwd=workspace, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or f"http://127.0.0.1:{port}" not in lines[-1]:
            lines.append(ui.stdout.readline())  # the server's own lines come first
            assert lines[-1], "".join(lines)
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # printed once it answers
            pass
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server's whole group is gone: the port frees
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"something still listens on port {port} after SIGTERM")
    finally:  # a failed assertion must not leave a server behind either
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ui.kill()
