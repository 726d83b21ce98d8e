"""A cache entry is served only to the code that made it, and a local model only by its content:
an edited method without a version bump, or replaced weights in a model folder, are recomputed."""
from __future__ import annotations

import importlib
import sys

import pytest
from click.testing import CliRunner
from conftest import write
from mlflow.tracking import MlflowClient

from sparselab import provenance
from sparselab.cache import StageCache
from sparselab.cli import main
from sparselab.registry import PRUNING

METHOD = '''
from sparselab.prune.base import PruningMethod


class EditedColumns(PruningMethod):
    patterns = ("unstructured",)

    def prune(self, loaded, ctx):
        from sparselab.prune.layers import prunable_linears
        for linear in prunable_linears(loaded.model).values():
            columns = int(linear.weight.shape[1] * ctx.config.sparsity * SHARE)
            linear.weight.data[:, :columns] = 0
        return {}


SHARE = %s
'''

MATRIX = """name: provenance
model: %s
data_dir: builtin
defaults:
  prune: {method: %s, sparsity: 0.5}
  recover: {method: none}
  evaluate: {perplexity: %s, tasks: []}
experiments:
  half: {}
"""


def _forget_sources():
    """A new process would read the files again; this one remembers what it read."""
    for cached in (provenance._file_text, provenance.imported_modules, provenance.source_files,
                   provenance.affects_results):
        cached.cache_clear()


def _cell_run(workspace, cell="half"):
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("provenance")
    runs = [r for r in client.search_runs([experiment.experiment_id],
                                          order_by=["attributes.start_time DESC"])
            if r.data.tags.get("sparselab.cell") == cell]
    return runs[0]


@pytest.fixture
def edited_method(tmp_path, monkeypatch):
    """A pruning method in a module of its own, which the test edits between runs."""
    folder = tmp_path / "plugin"
    write(folder / "edited_method.py", METHOD % "1.0")
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("edited_method")
    PRUNING.register("edited", module.EditedColumns, "a method whose source the test edits")

    def edit(share: str):
        write(folder / "edited_method.py", METHOD % share)
        PRUNING.unregister("edited")
        PRUNING.register("edited", importlib.reload(module).EditedColumns, "edited")
        _forget_sources()
    yield edit
    PRUNING.unregister("edited")
    sys.modules.pop("edited_method", None)
    _forget_sources()


def test_an_edited_method_is_recomputed_not_served(workspace, edited_method):
    matrix = write(workspace / "m.yaml", MATRIX % ("tiny-llama", "edited", "null"))
    first = CliRunner().invoke(main, ["run", str(matrix)])
    assert first.exit_code == 0, first.output
    before = _cell_run(workspace)
    assert before.data.metrics["sparsity.linear"] == pytest.approx(0.5, abs=0.01)

    same = CliRunner().invoke(main, ["run", str(matrix), "--rerun"])  # unchanged code: served
    assert same.exit_code == 0, same.output
    assert _cell_run(workspace).data.tags["sparselab.stage.prune.cache"] == "hit"

    edited_method("0.5")  # the computation changes, no version is bumped
    second = CliRunner().invoke(main, ["run", str(matrix), "--rerun"])
    assert second.exit_code == 0, second.output
    after = _cell_run(workspace)
    assert after.data.tags["sparselab.stage.prune.key"] == before.data.tags[
        "sparselab.stage.prune.key"]  # the same configuration ...
    assert after.data.tags["sparselab.stage.prune.cache"] == "miss"  # ... but not served
    assert after.data.metrics["sparsity.linear"] == pytest.approx(0.25, abs=0.01)
    assert after.data.tags["sparselab.stage.load.cache"] == "hit"  # the model's code is unedited
    said = " ".join(second.output.split())
    assert "made by other code" in said and "edited_method.py" in said
    superseded = list((workspace / "home" / "superseded").iterdir())
    assert len(superseded) == 1 and superseded[0].name.startswith("prune-")

    # the run names the code each stage was computed by, from its entry
    entry = StageCache().entry("prune", after.data.tags["sparselab.stage.prune.key"])
    assert entry.meta["code"]["files"]  # the hashed sources
    assert any(name.endswith("edited_method.py") for name in entry.meta["code"]["files"])
    assert after.data.tags["sparselab.stage.prune.code"] == provenance.describe(
        entry.meta["code"])
    assert entry.meta["code"]["source"][:12] in after.data.tags["sparselab.stage.prune.code"]


def test_plan_says_an_entry_was_made_by_other_code(workspace, edited_method):
    matrix = write(workspace / "m.yaml", MATRIX % ("tiny-llama", "edited", "null"))
    assert CliRunner().invoke(main, ["run", str(matrix)]).exit_code == 0
    edited_method("0.5")
    plan = CliRunner().invoke(main, ["plan", str(matrix)])
    assert plan.exit_code == 0, plan.output
    assert "made by other code" in plan.output
    assert list((workspace / "home" / "stages" / "prune").iterdir())  # plan only looks


def test_a_replaced_model_folder_is_not_served(workspace, tiny_model_dir):
    import shutil

    import torch

    from sparselab.models import load_model, save_model
    folder = workspace / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    matrix = write(workspace / "m.yaml", MATRIX % (
        folder, "magnitude", "{data: wikitext2, seqlen: 64, max_windows: 2}"))
    first = CliRunner().invoke(main, ["run", str(matrix)])
    assert first.exit_code == 0, first.output
    before = _cell_run(workspace)
    assert (workspace / "home" / "content.json").is_file()  # the hashes, kept for next time

    again = CliRunner().invoke(main, ["run", str(matrix), "--rerun"])  # same weights: served
    assert again.exit_code == 0, again.output
    assert _cell_run(workspace).data.tags["sparselab.stage.perplexity.cache"] == "hit"

    loaded = load_model(folder)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.mul_(0.5)
    save_model(loaded, folder)  # the same path, other weights
    second = CliRunner().invoke(main, ["run", str(matrix), "--rerun"])
    assert second.exit_code == 0, second.output
    after = _cell_run(workspace)
    assert after.data.tags["sparselab.stage.load.key"] != before.data.tags[
        "sparselab.stage.load.key"]
    assert after.data.tags["sparselab.stage.perplexity.cache"] == "miss"
    assert after.data.metrics["wikitext2.ppl"] != before.data.metrics["wikitext2.ppl"]


def test_a_folder_is_hashed_again_only_where_a_file_changed(tmp_path, monkeypatch):
    folder, memo = tmp_path / "model", tmp_path / "memo.json"
    write(folder / "config.json", "{}")
    write(folder / "model.safetensors", "weights")
    first = provenance.content_fingerprint(folder, memo)
    hashed = []
    real = provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda path: hashed.append(path.name)
                        or real(path))
    assert provenance.content_fingerprint(folder, memo) == first and hashed == []
    write(folder / "model.safetensors", "other weights")
    assert provenance.content_fingerprint(folder, memo) != first
    assert hashed == ["model.safetensors"]


def test_a_stage_s_source_is_what_its_computation_imports():
    """Wanda's prune reaches the walk through imports inside functions; the report, the CLI
    and the memory plan declare that they change no result and are left out."""
    files = provenance.source_files(("sparselab.stages.prune", "sparselab.prune.wanda.method",
                                     "sparselab.data.wikitext2"))
    for needed in ("sparselab/prune/wanda/method.py", "sparselab/prune/walk.py",
                   "sparselab/data/wikitext2.py", "sparselab/stages/prune.py"):
        assert needed in files, needed
    for left_out in ("sparselab/report.py", "sparselab/cli.py", "sparselab/footprint.py",
                     "sparselab/prune/sparsegpt/method.py", "sparselab/stats.py"):
        assert left_out not in files, left_out
    code = provenance.StageCode.of(["sparselab.stages.prune"], None)
    child = provenance.StageCode.of(["sparselab.stages.perplexity"], code.lineage)
    other_parent = provenance.StageCode.of(["sparselab.stages.perplexity"], "another")
    assert child.source == other_parent.source and child.lineage != other_parent.lineage
    assert provenance.difference(None, code).startswith("it records no code identity")
    recorded = {**code.record(), "lineage": "x"}
    assert provenance.difference(recorded, code) == \
        "the stage it was computed from was made by other code"
