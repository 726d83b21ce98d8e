"""`sparselab export`: the exported folder loads with plain transformers / peft and gives the
cell's own logits and sparsity; adapters name the pruned base; merging is said to fill it in."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from sparselab.cli import main
from sparselab.study import prepare_plans
from sparselab.prune.layers import sparsity_report

from conftest import write

pytestmark = pytest.mark.slow  # end-to-end: pytest -m 'not slow' leaves these out

MATRIX = """
name: export
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: wanda, sparsity: 0.5, calibration: {data: wikitext2, samples: 4, seqlen: 32}}
  recover:
    method: lora
    data: wikitext2
    lora: {r: 4, alpha: 8, dropout: 0.0, targets: [q_proj, v_proj]}
    train: {samples: 8, seqlen: 32, batch_size: 4, lr: 1.0e-2}
  evaluate:
    perplexity: {data: wikitext2, seqlen: 64, batch_size: 4, max_windows: 2}
    tasks: []
experiments:
  pruned: {recover.method: none}
  lora: {}
  structured:
    recover.method: none
    prune: {method: gqa_structured, sparsity: 0.25, options: {layer_importance: cosine}}
"""
TOKENS = torch.tensor([[5, 17, 300, 42, 9, 77, 128, 3]])


@pytest.fixture(scope="module")
def ran_in(tmp_path_factory):
    """The matrix run once for the module: (matrix file, its workspace)."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSELAB_HOME", str(root / "home"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.delenv("SPARSELAB_DATA_DIR", raising=False)
        patch.chdir(root)
        matrix = write(root / "export.yaml", MATRIX)
        result = CliRunner().invoke(main, ["run", str(matrix)])
        assert result.exit_code == 0, result.output
        yield matrix, root


@pytest.fixture
def ran(ran_in, tmp_path):
    return ran_in[0]


@pytest.fixture
def workspace(ran_in, tmp_path):
    """A fresh folder to export into, next to the module's store."""
    return tmp_path


def cell_model(matrix, cell):
    """The cell's final model as sparselab's runs use it."""
    from sparselab.cache import StageCache
    from sparselab.runner import StageRunner
    plan = next(p for p in prepare_plans(str(matrix), None, (), None)[1] if p.cell.name == cell)
    return StageRunner(StageCache()).model(plan.model, plan).model


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def export(matrix, cell, dest, *extra):
    return CliRunner().invoke(main, ["export", str(matrix), cell, "--to", str(dest), *extra])


def test_lora_cell_exports_its_pruned_base_and_adapter(ran, workspace):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    dest = workspace / "out" / "lora"
    result = export(ran, "lora", dest)
    assert result.exit_code == 0, result.output
    config = json.loads((dest / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(dest.resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(dest / "adapter").eval()
    expected = cell_model(ran, "lora")
    assert torch.allclose(logits(loaded), logits(expected), atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(dest)  # the base alone is the pruned model
    assert sparsity_report(base)[1]["sparsity.linear"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity_report(loaded.get_base_model())[1]["sparsity.linear"] == \
        pytest.approx(0.5, abs=1e-3)
    card = (dest / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM" in card
    assert "wikitext2.ppl" in card and "method: wanda" in card
    assert "base_model:" not in card  # the built-in tiny model is on no hub
    from sparselab.models import model_source
    assert model_source("smollm2-135m").hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    provenance = json.loads((dest / "sparselab_export.json").read_text())
    assert provenance["kind"] == "adapter" and provenance["cell"] == "lora"
    # the cell's run records where its model went and carries the card
    client = MlflowClient(f"sqlite:///{ran.parent}/mlflow.db")
    run = client.get_run(provenance["run_id"])
    assert run.data.tags["sparselab.export"] == str(dest.resolve())
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == ["export/README.md"]


def test_merge_fills_the_pruned_weights_and_says_so(ran, workspace):
    from transformers import AutoModelForCausalLM
    dest = workspace / "merged"
    result = export(ran, "lora", dest, "--merge")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert torch.allclose(logits(merged), logits(cell_model(ran, "lora")), atol=1e-4)
    assert sparsity_report(merged)[1]["sparsity.linear"] < 0.45  # q, v filled back in
    assert "fills the pruned weights back in" in (dest / "README.md").read_text()


def test_pruned_cell_loads_with_plain_transformers(ran, workspace):
    from transformers import AutoModelForCausalLM
    dest = workspace / "pruned"
    assert export(ran, "pruned", dest).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert torch.equal(logits(model), logits(cell_model(ran, "pruned")))
    assert "library_name: transformers" in (dest / "README.md").read_text()


def test_structured_cell_loads_through_sparselab(ran, workspace):
    import sparselab
    from transformers import AutoModelForCausalLM
    dest = workspace / "structured"
    result = export(ran, "structured", dest)
    assert result.exit_code == 0, result.output
    assert "sparselab.load_model" in result.output
    model = sparselab.load_model(dest).model
    assert torch.equal(logits(model), logits(cell_model(ran, "structured")))
    with pytest.raises(Exception):  # per-layer shapes: plain from_pretrained refuses them
        AutoModelForCausalLM.from_pretrained(dest)
    assert "Structurally pruned" in (dest / "README.md").read_text()


def test_export_refuses_what_it_cannot_do_cleanly(ran, workspace):
    taken = workspace / "taken"
    write(taken / "keep.txt", "mine")
    result = export(ran, "pruned", taken)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (taken / "keep.txt").read_text() == "mine"
    result = export(ran, "pruned", workspace / "m", "--merge")
    assert result.exit_code == 2 and "no adapter" in result.output
    assert not (workspace / "m").exists()
    result = export(ran, "nope", workspace / "n")
    assert result.exit_code == 2 and "pruned" in result.output  # names the valid cells
    result = CliRunner().invoke(main, ["export", str(ran), "lora", "--to", str(workspace / "x"),
                                       "--set", "recover.train.lr=0.5"])
    assert result.exit_code == 2 and "has not been run" in result.output
