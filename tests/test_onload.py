"""--onload on tiny-llama: the weights stay on the host, one decoder layer (or the embedding, or the
head) visits the accelerator at a time, and every result equals the all-on-device path.

On this CPU host and accelerator are one device, so the moves themselves cost nothing; what is
checked is that the onloaded code paths (the walk's visits, the streaming hooks, the lm-eval
device) give bit-identical masks, weights and scores, and that at no time more than one decoder
layer is on the accelerator. benchmarks/gpu_check.sh repeats the equality on a GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from click.testing import CliRunner

from sparselab.cli import main
from sparselab.onload import HOST, streamed
from sparselab.shapes import decoder_layers
from tests.test_run import SMOKE

IDS = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))


@contextmanager
def onload(monkeypatch, on: bool):
    monkeypatch.setenv("SPARSELAB_ONLOAD", "1" if on else "0")
    yield


class Visits:
    """Records, through nn.Module.to, which decoder layers are on the accelerator. Onloading
    moves a layer there and back in pairs (on this CPU both moves name the same device), so each
    call on a layer toggles it: the first starts a visit, the next ends it."""

    def __init__(self, monkeypatch, model):
        self.layers = {id(layer): index for index, layer in enumerate(decoder_layers(model))}
        self.visiting: set[int] = set()
        self.most = 0
        self.visits: list[int] = []
        original = torch.nn.Module.to

        def to(module, *args, **kwargs):
            moves = not (args and isinstance(args[0], torch.dtype))  # a cast stays put
            index = self.layers.get(id(module)) if moves else None
            if index in self.visiting:
                self.visiting.discard(index)
            elif index is not None:
                self.visiting.add(index)
                self.visits.append(index)
                self.most = max(self.most, len(self.visiting))
            return original(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)


def _prune_and_score(tiny_model_dir, method: str, pattern: str = "unstructured"):
    from sparselab.evaluate.perplexity import window_losses
    from sparselab.models import load_model
    from sparselab.prune.patterns import Pattern
    from sparselab.registry import PRUNING
    loaded = load_model(tiny_model_dir)
    pruner = PRUNING.get(method)()
    pruner.prune_layers(loaded.model, IDS, Pattern.parse(pattern), [0.5] * 4,
                        pruner.Options(), set())
    with streamed(loaded.model):
        losses = window_losses(loaded.model, IDS, batch_size=2)
    return loaded, {k: v.clone() for k, v in loaded.model.state_dict().items()}, losses


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_onloaded_pruning_and_perplexity_equal_the_on_device_path(tiny_model_dir, monkeypatch,
                                                                  method, pattern):
    with onload(monkeypatch, False):
        _, resident_weights, resident_losses = _prune_and_score(tiny_model_dir, method, pattern)
    with onload(monkeypatch, True):
        loaded, weights, losses = _prune_and_score(tiny_model_dir, method, pattern)
    assert losses == resident_losses
    assert weights.keys() == resident_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, resident_weights[name]), name
    assert all(p.device.type == HOST for p in loaded.model.parameters())


def test_the_walk_visits_one_layer_at_a_time(tiny_model_dir, monkeypatch):
    from sparselab.models import load_model
    from sparselab.prune.patterns import Pattern
    from sparselab.registry import PRUNING
    monkeypatch.setenv("SPARSELAB_ONLOAD", "1")
    loaded = load_model(tiny_model_dir)
    visits = Visits(monkeypatch, loaded.model)
    pruner = PRUNING.get("wanda")()
    pruner.prune_layers(loaded.model, IDS, Pattern.parse("unstructured"), [0.5] * 4,
                        pruner.Options(), set())
    assert visits.visits == [0, 1, 2, 3] and visits.most == 1 and not visits.visiting
    visits.visits.clear()
    with streamed(loaded.model):
        loaded.model(input_ids=IDS[:1])
    assert visits.visits == [0, 1, 2, 3] and visits.most == 1 and not visits.visiting
    loaded.model(input_ids=IDS[:1])  # the hooks are gone with the block
    assert visits.visits == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_matrix_run_with_onload_equals_the_plain_run(workspace, monkeypatch):
    """The smoke matrix's baseline end to end (prune, LoRA, perplexity, answer losses, lm-eval
    tasks): the same metrics with --onload as without."""
    import mlflow

    def metrics_of(tag: str) -> dict[str, float]:
        monkeypatch.setenv("SPARSELAB_HOME", str(workspace / tag))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace}/{tag}.db")
        args = ["run", str(SMOKE), "--only", "baseline"] + (["--onload"] if tag == "on" else [])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        mlflow.set_tracking_uri(f"sqlite:///{workspace}/{tag}.db")
        runs = mlflow.search_runs(search_all_experiments=True,
                                  filter_string="tags.sparselab.cell = 'baseline'")
        row = runs.iloc[0]
        return {k[len("metrics."):]: row[k] for k in runs.columns
                if k.startswith("metrics.") and not k.startswith("metrics.time.")
                and "speed" not in k and "per_s" not in k and "peak_memory" not in k
                and row[k] == row[k]}

    monkeypatch.setenv("SPARSELAB_ONLOAD", "0")  # and unset after the test, which --onload sets
    plain = metrics_of("off")
    onloaded = metrics_of("on")
    assert os.environ["SPARSELAB_ONLOAD"] == "1"  # --onload reached the stages
    assert plain and plain == onloaded


def test_onloaded_reconstruction_equals_the_on_device_path(tiny_model_dir, tmp_path,
                                                           monkeypatch):
    """The reconstruction recovery fits one pair of layers (pruned, dense) at a time on the
    accelerator when onloading: the same weights come out."""
    from sparselab.models import load_model
    from sparselab.recover.reconstruct import ReconstructRecovery
    from tests.test_recover import _ctx, _prune

    def reconstructed(on: bool, folder):
        folder.mkdir()
        monkeypatch.setenv("SPARSELAB_ONLOAD", "1" if on else "0")
        pruned, dense = load_model(tiny_model_dir), load_model(tiny_model_dir)
        _prune(pruned, "block:16x16")
        ctx = _ctx(folder, method="reconstruct", data="wikitext2",
                   train={"samples": 4, "seqlen": 32, "batch_size": 2, "epochs": 1})
        ctx.dense = lambda: dense
        visits = Visits(monkeypatch, pruned.model)
        recovered, _ = ReconstructRecovery().recover(pruned, ctx)
        monkeypatch.undo()  # nn.Module.to as it was
        return recovered.model.state_dict(), visits

    plain, not_visited = reconstructed(False, tmp_path / "off")
    onloaded, visits = reconstructed(True, tmp_path / "on")
    assert not not_visited.visits and visits.visits == [0, 1, 2, 3] and visits.most == 1
    for name, value in onloaded.items():
        assert torch.equal(value, plain[name]), name


@pytest.mark.parametrize("importance,layer_importance", [("taylor", "removal"),
                                                         ("magnitude", "cosine")])
def test_onloaded_structured_pruning_equals_the_on_device_path(tiny_model_dir, tmp_path,
                                                               monkeypatch, importance,
                                                               layer_importance):
    """GQA structured pruning under onloading: the layer importance walks one layer at a time
    (the removal analysis re-runs the layers after each skipped one, each a visit of its own),
    Taylor scores take the whole model to the accelerator for their backward passes; the same
    sliced model comes out, on the host."""
    from sparselab.models import load_model
    from tests.test_gqa_structured import cell, run_prune

    def pruned(on: bool, folder):
        monkeypatch.setenv("SPARSELAB_ONLOAD", "1" if on else "0")
        loaded = load_model(tiny_model_dir)
        visits = Visits(monkeypatch, loaded.model)
        metrics = run_prune(loaded, cell(0.25, importance=importance,
                                         layer_importance=layer_importance), folder)
        monkeypatch.undo()
        return loaded, metrics, visits

    plain, plain_metrics, not_visited = pruned(False, tmp_path / "off")
    onloaded, metrics, visits = pruned(True, tmp_path / "on")
    assert metrics == plain_metrics
    assert not not_visited.visits and visits.most == 1 and not visits.visiting
    walks = [0, 1, 2, 3] + ([1, 2, 3, 2, 3, 3] if layer_importance == "removal" else [])
    assert visits.visits == walks
    weights, reference = onloaded.model.state_dict(), plain.model.state_dict()
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        assert torch.equal(value, reference[name]), name
    assert all(p.device.type == HOST for p in onloaded.model.parameters())


@pytest.mark.parametrize("pattern", ["unstructured", "block:16x16"])
def test_onloaded_magnitude_pruning_equals_the_on_device_path(tiny_model_dir, tmp_path,
                                                              monkeypatch, pattern):
    """Magnitude pruning under onloading: each decoder layer visits the accelerator for its
    masks, one at a time; the same weights come out."""
    import logging

    from sparselab.data.catalog import resolve_data_dir
    from sparselab.matrix import Prune
    from sparselab.models import load_model
    from sparselab.prune.base import PruneContext
    from sparselab.registry import PRUNING

    def pruned(on: bool):
        monkeypatch.setenv("SPARSELAB_ONLOAD", "1" if on else "0")
        loaded = load_model(tiny_model_dir)
        visits = Visits(monkeypatch, loaded.model)
        config = Prune(method="magnitude", sparsity=0.5, pattern=pattern)
        PRUNING.get("magnitude")().prune(loaded, PruneContext(
            config, resolve_data_dir("builtin"), tmp_path, logging.getLogger("test")))
        monkeypatch.undo()
        return loaded.model.state_dict(), visits

    plain, not_visited = pruned(False)
    onloaded, visits = pruned(True)
    assert not not_visited.visits and visits.visits == [0, 1, 2, 3] and visits.most == 1
    for name, value in onloaded.items():
        assert torch.equal(value, plain[name]), name
