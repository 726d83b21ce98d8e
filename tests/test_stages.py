"""Adding a pruning method and an evaluation stage from outside the package: one class each,
registered by name, then run in a matrix like the shipped ones."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import write
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, PositiveInt

from sparselab.cli import main
from sparselab.matrix import CellConfig
from sparselab.prune.base import PruningMethod
from sparselab.registry import PRUNING
from sparselab.stages import (
    StageKind,
    plan_cell,
    register_evaluation,
    unregister_evaluation,
)

MATRIX = """name: toys
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: first_columns, sparsity: 0.25}
  recover: {method: none}
  evaluate:
    perplexity: null
    tasks: []
    weight_norm: {power: 2}
experiments:
  quarter: {}
  half: {prune.sparsity: 0.5}
"""


class FirstColumns(PruningMethod):
    """Zeroes the first `sparsity` share of every linear layer's input columns."""
    patterns = ("unstructured",)

    def prune(self, loaded, ctx):
        from sparselab.prune.layers import prunable_linears
        for linear in prunable_linears(loaded.model).values():
            columns = int(linear.weight.shape[1] * ctx.config.sparsity)
            linear.weight.data[:, :columns] = 0
        return {"toy.columns_share": ctx.config.sparsity}


class WeightNorm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    power: PositiveInt = 2


class WeightNormStage(StageKind):
    """The sum of |w|^power over the model's parameters: it sees pruning, which is the test."""
    name = "weight_norm"
    version = 1

    def section_of(self, cell: CellConfig) -> WeightNorm | None:
        return cell.evaluate.added(self.name)

    def label(self, section: WeightNorm) -> str:
        return f"weight norm p={section.power}"

    def compute(self, section: WeightNorm, parent, ctx) -> None:
        total = sum(float(p.detach().abs().pow(section.power).sum())
                    for p in parent.model.parameters())
        ctx.write_metrics({"weights.norm": total})


@pytest.fixture
def toys():
    PRUNING.register("first_columns", FirstColumns, "zeroes the first input columns (a test)")
    register_evaluation(WeightNormStage(), WeightNorm)
    yield
    PRUNING.unregister("first_columns")
    unregister_evaluation("weight_norm")


def test_toy_method_and_stage_run_in_a_matrix(workspace, toys):
    result = CliRunner().invoke(main, ["run", str(write(workspace / "toys.yaml", MATRIX))])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("toys")
    runs = {r.data.tags["sparselab.cell"]: r for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags}
    assert runs.keys() == {"dense", "quarter", "half"}
    norms = {name: run.data.metrics["weights.norm"] for name, run in runs.items()}
    assert norms["dense"] > norms["quarter"] > norms["half"] > 0
    assert runs["half"].data.metrics["toy.columns_share"] == 0.5
    assert runs["quarter"].data.params["evaluate.weight_norm.power"] == "2"
    assert "time.evaluate_s" in runs["half"].data.metrics
    assert "sparselab.stage.weight_norm.key" in runs["half"].data.tags


def test_added_section_enters_the_key_and_is_validated(workspace, toys):
    from sparselab.data.catalog import resolve_data_dir
    cell = {"model": "tiny-llama", "prune": {"method": "first_columns"},
            "evaluate": {"weight_norm": {"power": 2}}}
    source = resolve_data_dir("builtin")

    def key(**section):
        config = CellConfig.model_validate({**cell, "evaluate": {"weight_norm": section}})
        from sparselab.matrix import Cell
        return plan_cell(Cell(name="c", experiment=None, config=config), source) \
            .stage("weight_norm").key

    assert key(power=2) == key(power=2) != key(power=1)
    bad = write(workspace / "bad.yaml", MATRIX.replace("{power: 2}", "{powr: 2}"))
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "unknown key 'powr'" in result.output and "evaluate.weight_norm.powr" in result.output
    result = CliRunner().invoke(main, ["validate", str(write(
        workspace / "typo.yaml", MATRIX.replace("weight_norm:", "weight_nrm:")))])
    assert result.exit_code == 2 and "unknown key 'weight_nrm'" in result.output
