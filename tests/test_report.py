"""The report, from a tracking store filled with known runs through the real MLflow client."""
from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from sparselab.cli import main

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


def test_json_values_differences_noise_and_verdicts(store):
    client, parent, path = store
    result = _report(path, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {r["cell"]: r for r in data["rows"]}
    assert [r["cell"] for r in data["rows"]] == ["dense", "baseline", "exp1", "exp2", "exp3"]
    assert rows["baseline"]["config"] == {"prune.calibration.data": "wikitext2",
                                          "recover.data": "wikitext2"}
    f1 = rows["exp1"]["metrics"]["squadv2.f1"]
    assert f1["value"] == 30.0 and f1["delta"] == 10.0
    assert f1["noise"] == pytest.approx(2.0 * 2 ** 0.5) and f1["direction"] == "up"
    assert rows["exp1"]["metrics"]["boolq.acc"]["direction"] == "same"
    assert rows["exp2"]["metrics"]["squadv2.f1"]["direction"] == "same"
    assert rows["exp2"]["metrics"]["boolq.acc"]["direction"] == "down"
    assert rows["exp1"]["metrics"]["wikitext2.ppl"]["direction"] == "up"  # no stderr: exact
    assert rows["exp3"]["status"] == "FAILED"
    assert rows["exp3"]["metrics"]["squadv2.f1"]["value"] is None
    verdicts = {(v["cell"], v["metric"]): v["verdict"] for v in data["expectations"]}
    assert verdicts == {("exp1", "squadv2.f1"): "agrees", ("exp1", "boolq.acc"): "agrees",
                        ("exp1", "wikitext2.ppl"): "disagrees",
                        ("exp2", "squadv2.f1"): "disagrees", ("exp2", "boolq.acc"): "agrees",
                        ("exp3", "squadv2.f1"): "inconclusive"}
    assert data["summary"] == "3 of 6 expectations hold (1 inconclusive)"


def test_table_shows_failed_cells_as_failed_not_zero(store):
    _, _, path = store
    result = _report(path)
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("│ exp3"))
    assert "failed" in line and " 0 " not in line
    assert "3 of 6 expectations hold" in result.output


def test_markdown_csv_html_and_plot(store, workspace):
    client, parent, path = store
    md = _report(path, "--format", "md").output
    assert "| exp1 | wikitext2 | squad | 30 ± 2 | +10 ↑ |" in md
    rows = list(csv.reader(io.StringIO(_report(path, "--format", "csv").output)))
    assert rows[0][:3] == ["cell", "prune.calibration.data", "recover.data"]
    assert rows[3][0] == "exp1" and rows[3][3] == "30 ± 2"
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
    assert cells == ["dense", "baseline", "exp1", "exp2"]


def test_bad_report_requests(store, workspace):
    _, _, path = store
    result = _report(path, "--metrics", "squadv2.f2")
    assert result.exit_code == 2 and "unknown metric 'squadv2.f2'" in result.output
    assert "squadv2.f1" in result.output
    bad = write(workspace / "b.yaml", MATRIX.replace("baseline: baseline", "baseline: exp9"))
    result = _report(bad)
    assert result.exit_code == 2 and "report.baseline 'exp9' is not a cell" in " ".join(result.output.split())
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
