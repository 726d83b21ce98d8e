"""The report, from a tracking store filled with known runs through the real MLflow client."""
from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from statistics import NormalDist

import numpy as np
import pandas as pd

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from sparselab.cli import main
from sparselab.evaluate.examples import ExampleScores
from sparselab.stats import adjust, paired

from conftest import write

MATRIX = """name: study
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: magnitude, sparsity: 0.5}
  recover: {method: none}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64}, tasks: []}
experiments:
  baseline: {prune.calibration.data: wikitext2, recover.data: wikitext2}
  exp1:     {prune.calibration.data: wikitext2, recover.data: squad}
  exp2:     {prune.calibration.data: squad,     recover.data: squad}
  exp3:     {prune.calibration.data: wikitext2, recover.data: gsm8k}
expect:
  exp1: {squadv2.f1: up, boolq.acc: same, wikitext2.ppl: down}
  exp2: {squadv2.f1: up, boolq.acc: down}
  exp3: {squadv2.f1: same}
report:
  baseline: baseline
  metrics: [squadv2.f1, boolq.acc, wikitext2.ppl]
"""

# cell -> (calibration data, recovery data, metrics, status)
RUNS = {
    "dense": ("wikitext2", "wikitext2", {"squadv2.f1": 30.0, "squadv2.f1_stderr": 2.0,
                                         "boolq.acc": 0.62, "boolq.acc_stderr": 0.02,
                                         "wikitext2.ppl": 20.0}, "FINISHED"),
    "baseline": ("wikitext2", "wikitext2", {"squadv2.f1": 20.0, "squadv2.f1_stderr": 2.0,
                                            "boolq.acc": 0.60, "boolq.acc_stderr": 0.02,
                                            "wikitext2.ppl": 30.0}, "FINISHED"),
    # +10 F1 against a combined stderr of sqrt(2²+2²)=2.83: up; boolq -0.01 < 0.028: same
    "exp1": ("wikitext2", "squad", {"squadv2.f1": 30.0, "squadv2.f1_stderr": 2.0,
                                    "boolq.acc": 0.59, "boolq.acc_stderr": 0.02,
                                    "wikitext2.ppl": 31.0}, "FINISHED"),
    # +2 F1 is within noise: same (expected up -> disagrees); boolq -0.1: down (agrees)
    "exp2": ("squad", "squad", {"squadv2.f1": 22.0, "squadv2.f1_stderr": 2.0,
                                "boolq.acc": 0.50, "boolq.acc_stderr": 0.02,
                                "wikitext2.ppl": 29.0}, "FINISHED"),
    "exp3": ("wikitext2", "gsm8k", {}, "FAILED"),
}


@pytest.fixture
def store(workspace):
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    exp = client.create_experiment("study")
    parent = client.create_run(exp, tags={"sparselab.invocation": "run study.yaml"}).info.run_id
    for cell, (calib, data, metrics, status) in RUNS.items():
        run = client.create_run(exp, run_name=cell, tags={
            "mlflow.parentRunId": parent, "sparselab.cell": cell}).info.run_id
        client.log_param(run, "prune.calibration.data", calib)
        client.log_param(run, "recover.data", data)
        client.log_param(run, "prune.sparsity", "0.5")
        for name, value in metrics.items():
            client.log_metric(run, name, value)
        client.set_terminated(run, status)
    client.set_terminated(parent, "FAILED")
    path = write(workspace / "study.yaml", MATRIX)
    return client, parent, path


def _report(path, *args):
    result = CliRunner().invoke(main, ["report", str(path), *args])
    return result


def test_json_is_tidy_and_falls_back_to_the_unpaired_rule(store):
    """No run logged per-example scores: every Δ is judged by the labelled unpaired rule."""
    client, parent, path = store
    result = _report(path, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["paired"] is False and "exp1" in data["unpaired_cells"]
    assert "No per-example scores for" in data["rule"]
    rows = {(r["cell"], r["metric"]): r for r in data["rows"]}
    assert len(data["rows"]) == 5 * 3  # cell x metric
    assert [r["cell"] for r in data["rows"][::3]] == ["dense", "baseline", "exp1", "exp2", "exp3"]
    assert rows["baseline", "squadv2.f1"]["config.prune.calibration.data"] == "wikitext2"
    assert rows["baseline", "squadv2.f1"]["note"] == "baseline"
    f1 = rows["exp1", "squadv2.f1"]
    assert f1["value"] == 30.0 and f1["delta"] == 10.0 and f1["test"] == "unpaired-z"
    noise = 2.0 * 2 ** 0.5
    assert f1["p_value"] == pytest.approx(2 * (1 - NormalDist().cdf(10 / noise)))
    assert f1["ci_low"] == pytest.approx(10 - 1.959964 * noise, rel=1e-5)
    assert f1["direction"] == "up" and f1["quality"] == "better"
    # -0.01 against 0.028 of noise: neither a change nor within the 0.02 margin
    assert rows["exp1", "boolq.acc"]["direction"] == "unresolved"
    assert rows["exp2", "boolq.acc"]["direction"] == "down"
    assert rows["exp2", "boolq.acc"]["quality"] == "worse"
    ppl = rows["exp1", "wikitext2.ppl"]  # no noise estimate: compared as it is
    assert ppl["test"] == "exact" and ppl["direction"] == "up" and ppl["quality"] == "worse"
    assert rows["exp3", "squadv2.f1"]["status"] == "FAILED"
    assert rows["exp3", "squadv2.f1"]["value"] is None
    verdicts = {(v["cell"], v["metric"]): v["verdict"] for v in data["expectations"]}
    assert verdicts == {("exp1", "squadv2.f1"): "agrees", ("exp1", "boolq.acc"): "inconclusive",
                        ("exp1", "wikitext2.ppl"): "disagrees",
                        ("exp2", "squadv2.f1"): "inconclusive", ("exp2", "boolq.acc"): "agrees",
                        ("exp3", "squadv2.f1"): "inconclusive"}
    tested = [rows[c, m] for c, m in [("exp1", "squadv2.f1"), ("exp1", "boolq.acc"),
                                      ("exp2", "squadv2.f1"), ("exp2", "boolq.acc")]]
    assert [r["p_adjusted"] for r in tested] == pytest.approx(
        adjust([r["p_value"] for r in tested], "holm"))
    assert data["summary"] == ("2 of 6 expectations hold at α = 0.05 (Holm correction), "
                               "3 inconclusive")


def test_table_shows_failed_cells_as_failed_not_zero(store):
    _, _, path = store
    result = _report(path)
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("│ exp3"))
    assert "failed" in line and " 0 " not in line
    assert "2 of 6 expectations hold" in result.output


def test_markdown_csv_html_and_plot(store, workspace):
    client, parent, path = store
    md = _report(path, "--format", "md").output
    assert "| exp1 | wikitext2 | squad | 30 ± 2 | +10 ↑ better p<0.001 |" in md
    assert "| exp2 | boolq.acc | ↓ down | -0.1 ↓ worse |" in md  # the hypotheses table
    frame = pd.read_csv(io.StringIO(_report(path, "--format", "csv").output))
    assert list(frame.columns[:5]) == ["cell", "run_id", "status", "config.prune.calibration.data",
                                       "config.recover.data"]
    exp1 = frame[(frame.cell == "exp1") & (frame.metric == "squadv2.f1")].iloc[0]
    assert exp1.value == 30.0 and exp1.stderr == 2.0 and exp1.delta == 10.0
    html_text = _report(path, "--format", "html").output

    class Cells(HTMLParser):
        cells: list[str] = []

        def handle_data(self, data):
            self.cells.append(data)
    parser = Cells()
    parser.feed(html_text)
    assert "exp2" in parser.cells and "22 ± 2" in parser.cells
    plot = workspace / "report.png"
    result = _report(path, "--plot", str(plot), "--output", str(workspace / "r.md"))
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert (workspace / "r.md").read_text().startswith("### study")
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.png"} <= logged


def test_plot_wraps_its_panels_into_rows(workspace):
    """Twelve metrics make three rows of four panels, not one strip too wide to read."""
    import struct

    from sparselab.report import PLOT_COLUMNS, Row, build, plot
    metrics = [f"m{i}" for i in range(12)]
    rows = [Row(cell, "FINISHED", cell, {"x": cell}, {m: 1.0 + i for i, m in enumerate(metrics)})
            for cell in ("a", "b")]
    file = workspace / "wide.png"
    plot(build(rows, "t", metrics, "a"), file)
    width, height = struct.unpack(">II", file.read_bytes()[16:24])  # the PNG IHDR
    assert PLOT_COLUMNS == 4
    assert (width, height) == (1408, 1166)  # 4 x 3.2 in wide, 3 x 3.4 + 0.4 in high, at 110 dpi


def test_plot_uses_a_log_axis_where_cells_span_orders_of_magnitude(workspace, monkeypatch):
    """A perplexity of 12 million beside 29 would flatten every good cell to nothing."""
    from sparselab.plots import plt
    from sparselab.report import Row, build, plot
    made = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(subplots(*a, **k)) or made[-1])
    metrics = ["wikitext2.ppl", "sparsity.linear"]
    values = {"a": {"wikitext2.ppl": 29.2, "sparsity.linear": 0.5},
              "b": {"wikitext2.ppl": 1.2e7, "sparsity.linear": 0.6}}
    rows = [Row(cell, "FINISHED", cell, {"x": cell}, values[cell]) for cell in ("a", "b")]
    plot(build(rows, "t", metrics, "a"), workspace / "p.png")
    (_, axes), = made
    assert [ax.get_yscale() for ax in axes.flat[:2]] == ["log", "linear"]


def test_pivot_and_where(store):
    _, _, path = store
    result = _report(path, "--pivot", "rows=prune.calibration.data cols=recover.data value=squadv2.f1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| prune.calibration.data \\ recover.data | gsm8k | squad | wikitext2 |"
    assert lines[2] == "| squad |  | 22 ± 2 |  |"
    assert lines[3] == "| wikitext2 | failed | 30 ± 2 | 20 ± 2 |"
    result = _report(path, "--where", "recover.data=squad", "--format", "json")
    cells = [r["cell"] for r in json.loads(result.output)["rows"]]
    assert list(dict.fromkeys(cells)) == ["dense", "baseline", "exp1", "exp2"]


def test_only_shows_the_named_cells_and_their_baseline(store):
    _, _, path = store
    result = _report(path, "--only", "exp2", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(dict.fromkeys(r["cell"] for r in data["rows"])) == ["baseline", "exp2"]
    assert {v["cell"] for v in data["expectations"]} <= {"exp2"}
    result = _report(path, "--only", "exp7")
    assert result.exit_code == 2 and "exp7" in result.output and "exp2" in result.output


def test_bad_report_requests(store, workspace):
    _, _, path = store
    result = _report(path, "--metrics", "squadv2.f2")
    assert result.exit_code == 2 and "unknown metric 'squadv2.f2'" in result.output
    assert "squadv2.f1" in result.output
    bad = write(workspace / "b.yaml", MATRIX.replace("baseline: baseline", "baseline: exp9"))
    result = _report(bad)
    message = " ".join(result.output.split())  # refused when the matrix loads, with its line
    assert result.exit_code == 2 and "report.baseline 'exp9' is not an experiment" in message
    assert "b.yaml, line 18" in message
    other = write(workspace / "o.yaml", MATRIX.replace("name: study", "name: never_ran"))
    result = _report(other)
    assert result.exit_code == 2 and "no runs of 'never_ran'" in result.output
    assert "sparselab run" in result.output


def test_a_cell_named_like_the_reference_is_a_cell():
    from sparselab.matrix import is_dense_reference
    from sparselab.report import Row, differing_keys
    assert is_dense_reference("dense") and is_dense_reference("dense[1]")
    assert not is_dense_reference("dense_ft") and not is_dense_reference("densely")
    rows = [Row("dense", "FINISHED", "r0", {"recover.method": "none"}),
            Row("lora", "FINISHED", "r1", {"recover.method": "lora"}),
            Row("dense_ft", "FINISHED", "r2", {"recover.method": "dense"})]
    assert differing_keys(rows) == ["recover.method"]  # dense_ft's setting counts
    rows[1].params["prune.options"] = "{}"  # an empty option dict beside one with keys
    rows[2].params["prune.options.tiers.block"] = "16"
    assert differing_keys(rows) == ["prune.options.tiers.block", "recover.method"]


def test_a_data_mix_shares_the_data_column():
    """A mixed-calibration cell logs `prune.calibration.data.mix`; its column stays the data's."""
    from sparselab.report import Row, build, pivot
    rows = [Row("base", "FINISHED", "r0", {"prune.calibration.data": "wikitext2"}, {"m": 1.0}),
            Row("squad", "FINISHED", "r1", {"prune.calibration.data": "squad"}, {"m": 2.0}),
            Row("mixed", "FINISHED", "r2",
                {"prune.calibration.data.mix": '{"squad": 0.5, "wikitext2": 0.5}'}, {"m": 3.0})]
    report = build(rows, "t", ["m"], "base", where=None)
    assert report.keys == ["prune.calibration.data"]
    mix = 'mix={"squad": 0.5, "wikitext2": 0.5}'
    assert [r.setting("prune.calibration.data") for r in rows] == ["wikitext2", "squad", mix]
    header, body = pivot(report, "prune.calibration.data", "prune.calibration.data", "m")
    assert [line[0] for line in body] == sorted(["wikitext2", "squad", mix])
    only_mix = build(rows, "t", ["m"], "base", where={"prune.calibration.data": mix})
    assert [r.cell for r in only_mix.rows] == ["base", "mixed"]


# --- paired comparisons from logged per-example scores -------------------------------------------

PAIRED_MATRIX = """name: paired
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: magnitude, sparsity: 0.5}
  recover: {method: none}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64}, tasks: [boolq], limit: 100}
experiments:
  baseline: {prune.sparsity: 0.5}
  gains: {prune.sparsity: 0.4}
  noisy: {prune.sparsity: 0.45}
  old: {prune.sparsity: 0.55}
expect:
  gains: {boolq.acc: better, wikitext2.ppl: better}
  noisy: {boolq.acc: same}
  old: {boolq.acc: worse}
report: {baseline: baseline, metrics: [boolq.acc, wikitext2.ppl]}
"""


def _log_run(client, exp, parent, cell, params, metrics, examples=None, tags=None,
             status="FINISHED", tmp=None):
    run = client.create_run(exp, run_name=cell, tags={
        "mlflow.parentRunId": parent, "sparselab.cell": cell,
        "sparselab.data_source": "builtin", **(tags or {})}).info.run_id
    for key, value in params.items():
        client.log_param(run, key, value)
    for name, value in metrics.items():
        client.log_metric(run, name, value)
    for role, scores in (examples or {}).items():
        client.set_tag(run, f"sparselab.stage.{role}.key", role + "-key")
        folder = scores.write(tmp / run / role)
        client.log_artifact(run, str(folder), f"stages/{role}")
    client.set_terminated(run, status)
    return run


def _boolq(correct: list[int]) -> ExampleScores:
    scores = ExampleScores()
    scores.add("boolq.acc", [f"boolq/doc/{i}" for i in range(len(correct))], correct,
               full_score=1.0)
    return scores


def _ppl(window_nll: np.ndarray) -> ExampleScores:
    scores = ExampleScores()
    scores.add("wikitext2.ppl", [f"wikitext2/window/{i}" for i in range(len(window_nll))],
               window_nll, "exp_mean")
    return scores


def _metrics(correct, nll) -> dict[str, float]:
    p, n = np.mean(correct), len(correct)
    return {"boolq.acc": float(p), "boolq.acc_stderr": float(np.sqrt(p * (1 - p) / (n - 1))),
            "wikitext2.ppl": float(np.exp(np.mean(nll))),
            "wikitext2.ppl_stderr": float(np.exp(np.mean(nll)) * np.std(nll, ddof=1)
                                          / np.sqrt(len(nll)))}


@pytest.fixture
def paired_store(workspace):
    """baseline; `gains` answers 9 more questions right and none wrong (McNemar p = 2/512) and has
    every window 0.02 nats better; `noisy` matches the baseline on every question; `old` was
    logged before per-example scores existed; `relimited` was evaluated on a different limit."""
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    exp = client.create_experiment("paired")
    parent = client.create_run(exp, tags={"sparselab.invocation": "run"}).info.run_id
    rng = np.random.default_rng(0)
    base = [1] * 60 + [0] * 40
    gains = base[:60] + [1] * 9 + [0] * 31
    nll = rng.normal(3.0, 0.4, 40)
    gains_nll = nll - 0.02 + rng.normal(0, 0.005, 40)
    common = {"evaluate.limit": "100", "evaluate.tasks": "['boolq']",
              "evaluate.perplexity.seqlen": "64"}
    for cell, sparsity, correct, windows in [("dense", "0", base, nll),
                                             ("baseline", "0.5", base, nll),
                                             ("gains", "0.4", gains, gains_nll),
                                             ("noisy", "0.45", base, nll)]:
        _log_run(client, exp, parent, cell, {**common, "prune.sparsity": sparsity},
                 _metrics(correct, windows),
                 {"tasks": _boolq(correct), "perplexity": _ppl(windows)}, tmp=workspace)
    _log_run(client, exp, parent, "old", {**common, "prune.sparsity": "0.55"},
             _metrics(base[:30] + [0] * 70, nll), tmp=workspace)
    return client, write(workspace / "paired.yaml", PAIRED_MATRIX)


def test_paired_verdicts_from_logged_examples(paired_store):
    _, path = paired_store
    data = json.loads(_report(path, "--format", "json").output)
    rows = {(r["cell"], r["metric"]): r for r in data["rows"]}
    acc = rows["gains", "boolq.acc"]
    direct = paired({f"boolq/doc/{i}": float(i < 60) for i in range(100)},
                    {f"boolq/doc/{i}": float(i < 69) for i in range(100)}, full_score=1.0)
    assert acc["test"] == "mcnemar" and acc["n"] == 100
    assert acc["p_value"] == pytest.approx(2 / 2 ** 9) == pytest.approx(direct.p_value)
    assert acc["ci_low"] == pytest.approx(direct.ci_low)
    # the unpaired rule on the same two cells would not see it
    unpaired_p = 2 * (1 - NormalDist().cdf(0.09 / np.hypot(rows["gains", "boolq.acc"]["stderr"],
                                                          rows["baseline", "boolq.acc"]["stderr"])))
    assert unpaired_p > 0.15
    assert acc["direction"] == "up" and acc["quality"] == "better"
    ppl = rows["gains", "wikitext2.ppl"]
    assert ppl["test"] == "permutation" and ppl["n"] == 40 and ppl["delta"] < 0
    assert ppl["p_value"] < 0.001 and ppl["quality"] == "better"
    same = rows["noisy", "boolq.acc"]  # identical answers: equivalent within 0.02
    assert same["direction"] == "same" and same["ci_high"] < 0.02
    old = rows["old", "boolq.acc"]  # no per-example scores: the labelled unpaired rule
    assert old["test"] == "unpaired-z" and data["unpaired_cells"] == ["old"]
    verdicts = {(v["cell"], v["metric"]): v["verdict"] for v in data["expectations"]}
    assert verdicts == {("gains", "boolq.acc"): "agrees", ("gains", "wikitext2.ppl"): "agrees",
                        ("noisy", "boolq.acc"): "agrees", ("old", "boolq.acc"): "agrees"}
    # --unpaired: the same runs judged by their standard errors alone
    unpaired = json.loads(_report(path, "--format", "json", "--unpaired").output)
    loose = {(r["cell"], r["metric"]): r for r in unpaired["rows"]}
    assert loose["gains", "boolq.acc"]["test"] == "unpaired-z"
    assert loose["gains", "boolq.acc"]["direction"] == "unresolved"
    assert {v["cell"]: v["verdict"] for v in unpaired["expectations"]
            if v["metric"] == "boolq.acc"}["gains"] == "inconclusive"
    assert "--unpaired" in unpaired["rule"] and "--rerun" not in unpaired["rule"]
    # --baseline: against another cell; the hypotheses, stated against report.baseline, drop
    other = json.loads(_report(path, "--format", "json", "--baseline", "gains").output)
    assert other["baseline"] == "gains" and other["expectations"] == []
    back = next(r for r in other["rows"] if (r["cell"], r["metric"]) == ("baseline", "boolq.acc"))
    assert back["delta"] == pytest.approx(-0.09) and back["quality"] == "worse"
    # Holm over the four tested hypotheses
    raw = [rows[k]["p_value"] for k in [("gains", "boolq.acc"), ("gains", "wikitext2.ppl"),
                                        ("noisy", "boolq.acc"), ("old", "boolq.acc")]]
    adjusted = [rows[k]["p_adjusted"] for k in [("gains", "boolq.acc"), ("gains", "wikitext2.ppl"),
                                                ("noisy", "boolq.acc"), ("old", "boolq.acc")]]
    assert adjusted == pytest.approx(adjust(raw, "holm"))


def test_correction_and_alpha_come_from_the_matrix(paired_store, workspace):
    """At alpha 0.001 the 9-of-9 McNemar gain (p = 0.0039, 0.0078 after Benjamini-Hochberg) is
    no longer shown, and the report says how many questions would show it."""
    _, path = paired_store
    strict = write(workspace / "strict.yaml", PAIRED_MATRIX.replace(
        "report: {baseline: baseline,", "report: {alpha: 0.001, correction: bh, baseline: baseline,"))
    data = json.loads(_report(strict, "--format", "json").output)
    assert data["alpha"] == 0.001 and data["correction"] == "bh"
    acc = next(r for r in data["rows"] if (r["cell"], r["metric"]) == ("gains", "boolq.acc"))
    assert acc["direction"] == "unresolved" and acc["verdict"] == "inconclusive"
    tested = [r for r in data["rows"] if r["expected"] and r["p_value"] is not None]
    assert acc["p_adjusted"] == pytest.approx(
        adjust([r["p_value"] for r in tested], "bh")[tested.index(acc)])
    assert acc["p_adjusted"] > 0.001
    assert acc["n_needed"] > 100 and acc["mde"] > 0.09
    md = _report(strict, "--format", "md").output
    assert f"this Δ needs ~{acc['n_needed']} examples" in md


def test_cells_evaluated_differently_are_not_compared(paired_store):
    """A cell re-evaluated at limit 6 is not shown ↑ against cells at limit 4."""
    client, path = paired_store
    exp = client.get_experiment_by_name("paired").experiment_id
    parent = client.create_run(exp, tags={"sparselab.invocation": "run"}).info.run_id
    _log_run(client, exp, parent, "gains", {"evaluate.limit": "6", "evaluate.tasks": "['boolq']",
                                           "evaluate.perplexity.seqlen": "64",
                                           "prune.sparsity": "0.4"},
             {"boolq.acc": 1.0, "boolq.acc_stderr": 0.0, "wikitext2.ppl": 10.0},
             {"tasks": _boolq([1] * 6)}, tmp=path.parent)
    data = json.loads(_report(path, "--format", "json").output)
    acc = next(r for r in data["rows"] if (r["cell"], r["metric"]) == ("gains", "boolq.acc"))
    assert acc["delta"] is None and acc["direction"] is None
    assert "evaluated differently: evaluate.limit 6 vs 100" in acc["note"]
    verdict = next(v for v in data["expectations"] if v["cell"] == "gains"
                   and v["metric"] == "boolq.acc")
    assert verdict["verdict"] == "inconclusive" and "evaluate.limit" in verdict["reason"]
    assert "not comparable" in _report(path, "--format", "md").output
    # --all shows both runs of the cell, the newest first
    every = json.loads(_report(path, "--format", "json", "--all").output)
    gains_runs = list(dict.fromkeys(r["run_id"] for r in every["rows"] if r["cell"] == "gains"))
    values = [r["value"] for r in every["rows"] if r["cell"] == "gains" and r["metric"] == "boolq.acc"]
    assert len(gains_runs) == 2 and values == [1.0, 0.69]


def test_tidy_csv_and_json_round_trip_through_pandas(paired_store):
    _, path = paired_store
    from_csv = pd.read_csv(io.StringIO(_report(path, "--format", "csv").output))
    from_json = pd.DataFrame(json.loads(_report(path, "--format", "json").output)["rows"])
    assert len(from_csv) == len(from_json) == 5 * 2
    assert from_csv.groupby(["cell", "metric"]).size().max() == 1  # one row per cell x metric
    for column in ("value", "stderr", "delta", "ci_low", "ci_high", "p_value", "p_adjusted"):
        assert pd.api.types.is_float_dtype(from_csv[column]), column
        pd.testing.assert_series_equal(from_csv[column], from_json[column].astype(float),
                                       check_names=False)
    assert not from_csv.astype(str).apply(lambda col: col.str.contains("±")).any().any()
    assert set(from_csv["verdict"].dropna()) == {"agrees"}


def test_better_and_worse_are_marked_in_every_format(paired_store):
    _, path = paired_store
    md = _report(path, "--format", "md").output
    assert "↑ better" in md and "↓ better" in md  # accuracy up, perplexity down
    html_text = _report(path, "--format", "html").output
    assert "style='color:#1a7f37'>+0.09 ↑ better" in html_text
    terminal = _report(path).output
    assert "↑ better" in terminal and "agrees" in terminal


def test_cells_scored_on_different_data_are_not_paired(workspace):
    """Same names, same settings, different text behind them (another data folder, another
    tokenizer): the fingerprints differ and the Δ is refused."""
    from sparselab.report import Refusal, Row, compare
    a, b = _ppl(np.full(8, 3.0)), _ppl(np.full(8, 2.0))
    a.fingerprint["wikitext2.ppl"], b.fingerprint["wikitext2.ppl"] = "aaaa1111", "bbbb2222"
    rows = [Row(name, "FINISHED", name, {}, {"wikitext2.ppl": value}, examples=scores)
            for name, value, scores in (("base", 20.1, a), ("cell", 7.4, b))]
    refused = compare(rows[1], rows[0], "wikitext2.ppl")
    assert isinstance(refused, Refusal) and "different examples" in refused.reason
    b.fingerprint["wikitext2.ppl"] = "aaaa1111"
    assert compare(rows[1], rows[0], "wikitext2.ppl").direction == "down"


def test_a_setting_added_later_reads_as_its_default():
    """Runs logged before `evaluate.sample` existed scored the first `limit` documents: they
    compare with `sample: first`, not with `sample: random`."""
    from sparselab.report import Refusal, Row, compare, with_evaluation_defaults
    old = with_evaluation_defaults({"evaluate.limit": "100", "evaluate.answer_loss.limit": "200"})
    assert old["evaluate.sample"] == "first" and old["evaluate.answer_loss.sample"] == "first"
    assert "evaluate.perplexity.seqlen" not in old  # a section the run did not log stays out
    metrics = {"boolq.acc": 0.6, "boolq.acc_stderr": 0.05}
    base = Row("base", "FINISHED", "r0", old, metrics)
    first = Row("a", "FINISHED", "r1", {**old, "evaluate.sample": "first"}, metrics)
    drawn = Row("b", "FINISHED", "r2", {**old, "evaluate.sample": "random"}, metrics)
    assert not isinstance(compare(first, base, "boolq.acc"), Refusal)
    assert "evaluate.sample random vs first" in compare(drawn, base, "boolq.acc").reason


def test_runs_logged_before_the_renames_read_under_todays_names():
    """`params.*` metrics (now `weights.*`) and stderr metrics (now `sparselab.stderr.` tags)
    of old runs read the same as new runs."""
    from types import SimpleNamespace

    from sparselab.tracking import run_metrics, split_stderr
    old = SimpleNamespace(data=SimpleNamespace(
        metrics={"params.total": 10.0, "boolq.acc": 0.6, "boolq.acc_stderr": 0.05}, tags={}))
    values, tags = split_stderr({"weights.total": 10.0, "boolq.acc": 0.6,
                                 "boolq.acc_stderr": 0.05})
    new = SimpleNamespace(data=SimpleNamespace(metrics=values, tags=tags))
    assert tags == {"sparselab.stderr.boolq.acc": "0.05"}
    assert run_metrics(old) == run_metrics(new) == {"weights.total": 10.0, "boolq.acc": 0.6,
                                                    "boolq.acc_stderr": 0.05}


def test_settings_a_cell_does_not_have_make_no_column():
    """An unrecovered cell logs no LoRA settings: the LoRA cells agreeing on them is no
    difference, recover.method is."""
    from sparselab.report import Row, differing_keys
    none = {"recover.method": "none", "prune.sparsity": "0.5"}
    lora = {"recover.method": "lora", "recover.lora.r": "8", "prune.sparsity": "0.5"}
    rows = [Row("a", "FINISHED", "1", none), Row("b", "FINISHED", "2", lora),
            Row("c", "FINISHED", "3", {**lora, "prune.sparsity": "0.6"})]
    assert differing_keys(rows) == ["prune.sparsity", "recover.method"]
    rows.append(Row("d", "FINISHED", "4", {**lora, "recover.lora.r": "16"}))
    assert differing_keys(rows) == ["prune.sparsity", "recover.lora.r", "recover.method"]


def test_speed_metrics_read_as_speedups_and_draw_a_pareto_front(workspace):
    """Latency and throughput changes also read as '×' faster than the baseline; a report with a
    speed metric and a quality metric draws accuracy against speed-up with its Pareto front."""
    import struct

    from sparselab.report import (Row, build, change_text, orientation, pareto_front,
                                  plot_pareto, speedup)
    assert orientation("speed.prefill_ms_512") == -1
    assert orientation("speed.csr.decode_tok_s_b8") == 1
    assert speedup("speed.prefill_ms_512", 50.0, 100.0) == 2.0  # half the latency: x2
    assert speedup("speed.decode_tok_s_b1", 50.0, 100.0) == 0.5  # half the throughput: x0.5
    assert speedup("speed.weights_mb", 1.0, 2.0) is None and speedup("wikitext2.ppl", 1, 2) is None
    cells = {"dense": (100.0, 30.0), "fast_bad": (50.0, 60.0), "slow_bad": (150.0, 45.0),
             "fast_good": (80.0, 35.0)}
    hardware = {"sparselab.speed.hardware": "cpu: x"}
    rows = [Row(name, "FINISHED", name, {"x": name},
                {"speed.prefill_ms_512": ms, "speed.prefill_ms_512_stderr": 1.0,
                 "wikitext2.ppl": ppl}, dict(hardware)) for name, (ms, ppl) in cells.items()]
    report = build(rows, "speedy", ["speed.prefill_ms_512", "wikitext2.ppl"], "dense")
    change = report.change(report.row("fast_bad"), "speed.prefill_ms_512")
    assert change.speedup == 2.0 and change.direction == "down"
    assert "×2.00" in change_text("speed.prefill_ms_512", change)[0]
    # measured on other hardware: not compared
    report.row("slow_bad").tags["sparselab.speed.hardware"] = "cpu: y"
    assert "not comparable" in change_text(
        "speed.prefill_ms_512", report.change(report.row("slow_bad"), "speed.prefill_ms_512"))[0]
    # speed-up and (negated, so higher is better) perplexity: slow_bad is beaten on both
    points = {name: (100.0 / ms, -ppl) for name, (ms, ppl) in cells.items()}
    assert pareto_front(points) == ["dense", "fast_good", "fast_bad"]
    file = workspace / "pareto.png"
    assert plot_pareto(report, file)
    assert struct.unpack(">II", file.read_bytes()[16:24]) == (660, 495)
    assert not plot_pareto(build(rows, "t", ["wikitext2.ppl"], "dense"), workspace / "no.png")
