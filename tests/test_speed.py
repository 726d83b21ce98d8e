"""The inference-cost stage: which kernel each pattern gets, sparse outputs equal to dense ones,
exact restoring, the byte counts, a wrong kernel caught, and the stage in a matrix."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import write
from sparselab.cli import main
from sparselab.evaluate import speed as speed_module
from sparselab.evaluate.speed import (
    CSR,
    SEMI_2_4,
    SpeedSettings,
    kernel_for,
    speed,
    structure,
    using_kernel,
    weight_bytes,
)
from sparselab.prune.layers import prunable_linears
from sparselab.prune.options import TierOptions
from sparselab.prune.patterns import mask_for_pattern, tiers_mask

QUICK = SpeedSettings(prompt_lengths=(8,), batch_sizes=(1, 2), decode_prompt=4, new_tokens=2,
                      warmup=0, repeats=2)
CPU = torch.device("cpu")


def prune_as(model, pattern: str) -> None:
    """Zero the model's prunable linears by magnitude in `pattern` (or `tiers`, 8x8 blocks)."""
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            scores = linear.weight.abs()
            if pattern == "tiers":
                keep = tiers_mask(scores, TierOptions(ratios=(0.25, 0.5, 0.25), block=8))
            else:
                keep = mask_for_pattern(scores, pattern, 0.5, per_row=True)
            linear.weight.mul_(keep)


@pytest.mark.parametrize("pattern, kernel", [
    ("dense", None), ("unstructured", "csr"), ("2:4", None), ("block:8x8", "bsr8"),
    ("block:16x16", "bsr16"), ("tiers", "bsr8")])
def test_each_pattern_gets_the_kernel_made_for_its_zeros(tiny, pattern, kernel):
    if pattern != "dense":
        prune_as(tiny.model, pattern)
    found = structure(tiny.model)
    chosen, why_not = kernel_for(found, CPU, torch.float32)
    assert (chosen.name if chosen else None) == kernel
    if pattern == "2:4":  # a CPU has no kernel for it: said, not guessed
        assert found.two_four and "CUDA" in why_not
        on_gpu, _ = kernel_for(found, torch.device("cuda"), torch.bfloat16)
        assert on_gpu is SEMI_2_4
        assert kernel_for(found, torch.device("cuda"), torch.float32)[0] is None
    if pattern == "tiers":  # a quarter of the 8x8 tiles are removed whole
        assert found.block_zero_tiles == pytest.approx(0.25, abs=0.02)
    if pattern == "dense":
        assert why_not == "no zeros to skip"


@pytest.mark.parametrize("pattern", ["unstructured", "block:8x8", "tiers"])
def test_sparse_kernels_give_the_dense_logits_and_restore_the_weights_exactly(tiny, pattern):
    prune_as(tiny.model, pattern)
    kernel, _ = kernel_for(structure(tiny.model), CPU, torch.float32)
    before = {name: linear.weight.clone() for name, linear in prunable_linears(tiny.model).items()}
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 16), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        dense = tiny.model(input_ids=ids).logits
        with using_kernel(tiny.model, kernel) as swapped:
            sparse = tiny.model(input_ids=ids).logits
            held = weight_bytes(tiny.model)
    assert swapped == len(before)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    after = prunable_linears(tiny.model)
    assert all(torch.equal(after[name].weight, weight) for name, weight in before.items())
    # the bytes held: the layout's values and indices instead of the dense weights
    dense_bytes = sum(w.numel() * 4 for w in before.values())
    if kernel is CSR:
        layout = sum(int((w != 0).sum()) * (4 + 8) + (w.shape[0] + 1) * 8
                     for w in before.values())
    else:
        b = int(kernel.name.removeprefix("bsr"))
        tiles = [int((w != 0).reshape(w.shape[0] // b, b, w.shape[1] // b, b).any(dim=(1, 3))
                     .sum()) for w in before.values()]
        layout = sum(t * b * b * 4 + t * 8 + (w.shape[0] // b + 1) * 8
                     for t, w in zip(tiles, before.values()))
    assert held == weight_bytes(tiny.model) - dense_bytes + layout


def test_speed_reports_both_kernels_and_the_cells_own(tiny):
    prune_as(tiny.model, "block:8x8")
    result = speed(tiny.model, QUICK, tiny.model.config.vocab_size)
    m = result.metrics
    assert result.kernel == "bsr8" and "BSR" in result.notes["bsr8"]
    for prefix in ("speed.dense.", "speed.bsr8.", "speed."):
        assert m[prefix + "prefill_ms_8"] > 0 and m[prefix + "decode_tok_s_b2"] > 0
        assert m[prefix + "weights_mb"] > 0 and m[prefix + "peak_mb"] > 0
    assert m["speed.decode_tok_s_b1"] == m["speed.bsr8.decode_tok_s_b1"]
    assert m["speed.weights_mb"] < m["speed.dense.weights_mb"]  # half the blocks are not stored
    assert m["speed.bsr8.max_abs_diff"] < 1e-4


def test_a_wrong_kernel_is_not_reported_as_fast(tiny, monkeypatch):
    prune_as(tiny.model, "unstructured")
    broken = speed_module.Kernel("csr", "doubles every weight", lambda w: (2 * w).to_sparse_csr())
    monkeypatch.setattr(speed_module, "kernel_for", lambda *a: (broken, ""))
    result = speed(tiny.model, QUICK, tiny.model.config.vocab_size)
    assert result.kernel == "none" and "wrong" in result.notes["none"]
    assert result.metrics["speed.csr.max_abs_diff"] > 1e-3
    assert "speed.csr.decode_tok_s_b1" not in result.metrics
    assert result.metrics["speed.decode_tok_s_b1"] == result.metrics["speed.dense.decode_tok_s_b1"]


MATRIX = """name: speedy
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: magnitude, sparsity: 0.5, pattern: unstructured}
  recover: {method: none}
  evaluate:
    perplexity: {data: wikitext2, seqlen: 64, batch_size: 4, max_windows: 2}
    tasks: []
    speed: {prompt_lengths: [8], batch_sizes: [1], decode_prompt: 4, new_tokens: 2, warmup: 0,
            repeats: 2, threads: 1}
experiments:
  unstructured: {}
  nm_2_4: {prune.pattern: "2:4"}
  structured: {prune.method: gqa_structured, prune.sparsity: 0.25,
               prune.options: {importance: magnitude, layer_importance: cosine}}
"""


def test_speed_stage_runs_in_a_matrix_and_is_cached(workspace):
    path = write(workspace / "speedy.yaml", MATRIX)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("speedy")
    runs = {r.data.tags["sparselab.cell"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`sparselab.cell` != ''")}
    kernels = {name: run.data.tags["sparselab.speed.kernel"] for name, run in runs.items()}
    assert kernels == {"dense": "none", "unstructured": "csr", "nm_2_4": "none",
                       "structured": "none"}
    assert "CUDA" in runs["nm_2_4"].data.tags["sparselab.speed.kernels"]
    assert runs["unstructured"].data.metrics["speed.csr.decode_tok_s_b1"] > 0
    assert runs["unstructured"].data.metrics["speed.threads"] == 1
    # the structured cell runs its real, smaller shapes on the dense kernel
    assert runs["structured"].data.metrics["speed.weights_mb"] < \
        runs["dense"].data.metrics["speed.weights_mb"]
    entries = list((workspace / "home" / "stages" / "speed").iterdir())
    assert len(entries) == 4
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["config"]["hardware"].startswith("cpu: ") and meta["config"]["threads"] == 1
    rerun = CliRunner().invoke(main, ["run", str(path), "--rerun"])
    assert rerun.exit_code == 0, rerun.output
    assert len(list((workspace / "home" / "stages" / "speed").iterdir())) == 4
    # the report: speed-ups against the dense reference, and accuracy against speed on the
    # parent run
    report = CliRunner().invoke(main, [
        "report", str(path), "--format", "md", "--baseline", "dense", "--metrics",
        "speed.decode_tok_s_b1,wikitext2.ppl", "--plot", str(workspace / "speedy.png")])
    assert report.exit_code == 0, report.output
    assert "×" in report.output
    assert (workspace / "speedy_pareto.png").is_file()
    parent = client.search_runs([experiment.experiment_id], "tags.`sparselab.invocation` != ''",
                                order_by=["attributes.start_time DESC"])[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/speedy_pareto.png" in logged


def test_a_speed_entry_is_not_computed_for_other_hardware(workspace, monkeypatch):
    """An entry keyed for one machine and computed on another would file its numbers under
    the wrong hardware: refused."""
    from sparselab.stages import speed as speed_stage
    path = write(workspace / "speedy.yaml", MATRIX)
    monkeypatch.setattr(speed_stage, "hardware_label", lambda: "cpu: the planner's")
    from sparselab.study import prepare_plans
    _, plans = prepare_plans(str(path), "unstructured", (), None)
    stage = plans[0].stage("speed")
    assert stage.config["hardware"] == "cpu: the planner's"
    monkeypatch.setattr(speed_stage, "hardware_label", lambda: "cpu: another")
    with pytest.raises(RuntimeError, match="planned for 'cpu: the planner's'"):
        stage.kind.compute(stage.section, None, type("Ctx", (), {"keyed": stage.config})())


def test_a_misspelt_speed_setting_names_its_key_and_line(workspace):
    path = write(workspace / "bad.yaml", MATRIX.replace("new_tokens: 2", "new_token: 2"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "evaluate.speed.new_token" in result.output and "line 10" in result.output
    assert "Did you mean 'new_tokens'?" in result.output


def test_the_csr_layout_holds_its_values_and_column_indices_only():
    """torch's to_sparse_csr keeps its column indices as a view of the COO (2 x nnz) indices it
    converted through: every row index too. The kernel's layout holds what CSR holds."""
    from sparselab.evaluate.speed import CSR
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    weight[weight.abs() < 0.7] = 0
    layout = CSR.layout(weight)
    nnz = int((weight != 0).sum())
    held = sum(part.untyped_storage().nbytes() for part in
               (layout.values(), layout.col_indices(), layout.crow_indices()))
    assert held == nnz * (4 + 8) + (96 + 1) * 8
    assert torch.equal(layout.to_dense(), weight)
