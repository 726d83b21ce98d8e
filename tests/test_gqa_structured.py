"""GQA-aware structured pruning on tiny-llama (4 layers, 4 query / 2 KV heads, head_dim 16,
hidden 64, intermediate 192), checked against independent computations."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from sparselab.cache import StageCache
from sparselab.data.catalog import resolve_data_dir
from sparselab.matrix import CellConfig, config_hash
from sparselab.models import load_model, save_model
from sparselab.prune import layer_importance as li
from sparselab.prune.base import PruneContext
from sparselab.prune.gqa_structured.method import (GQAStructuredPruning, allocate, cap_ratios,
                                            raw_ratios, taylor_scores)
from sparselab.shapes import SHAPES_FILE
from sparselab.registry import PRUNING

from conftest import REPO, write

LOG = logging.getLogger("test")
CALIB = {"samples": 4, "seqlen": 32}
HD, G, KV, HEADS, INTER, HIDDEN = 16, 2, 2, 4, 192, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is ~100x faster than two on a loaded 2-core machine (OpenMP
    threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cell(sparsity=0.25, **options) -> CellConfig:
    return CellConfig.model_validate({"model": "tiny-llama", "data_dir": "builtin", "prune": {
        "method": "gqa_structured", "sparsity": sparsity, "calibration": CALIB,
        "options": options}})


def run_prune(loaded, config: CellConfig, tmp_path, cache=None, model_key="tiny") -> dict:
    method = PRUNING.get("gqa_structured")()
    method.check(config.prune)
    method.check_model(config.prune, loaded.model.config)
    ctx = PruneContext(config.prune, resolve_data_dir("builtin"), tmp_path / "artifacts", LOG,
                       model_key=model_key, cache=cache)
    return method.prune(loaded, ctx)


def kept_groups(original: nn.Module, pruned: nn.Module, layer: int) -> list[int]:
    """Which KV groups survived, found by matching the pruned k_proj rows to the original's."""
    k0 = original.model.layers[layer].self_attn.k_proj.weight.view(KV, HD, HIDDEN)
    k1 = pruned.model.layers[layer].self_attn.k_proj.weight.view(-1, HD, HIDDEN)
    return [next(j for j in range(KV) if torch.equal(k0[j], row)) for row in k1]


def kept_channels(original: nn.Module, pruned: nn.Module, layer: int) -> list[int]:
    up0 = original.model.layers[layer].mlp.up_proj.weight
    up1 = pruned.model.layers[layer].mlp.up_proj.weight
    return [int((up0 == row).all(dim=1).nonzero()[0]) for row in up1]


@torch.no_grad()
def masked_copy(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """The original with the removed groups'/channels' weights set to zero."""
    masked = copy.deepcopy(original)
    for i, layer in enumerate(masked.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for j in set(range(KV)) - set(kept_groups(original, pruned, i)):
            q = slice(j * G * HD, (j + 1) * G * HD)
            kv = slice(j * HD, (j + 1) * HD)
            attn.q_proj.weight[q] = 0
            attn.k_proj.weight[kv] = 0
            attn.v_proj.weight[kv] = 0
            attn.o_proj.weight[:, q] = 0
        gone = sorted(set(range(INTER)) - set(kept_channels(original, pruned, i)))
        mlp.gate_proj.weight[gone] = 0
        mlp.up_proj.weight[gone] = 0
        mlp.down_proj.weight[:, gone] = 0
    return masked


def ids(n=2, length=24, seed=0):
    return torch.randint(5, 1000, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pruned_both(tiny_model_dir, tmp_path_factory):
    """tiny-llama pruned at 0.3 (taylor, removal, inverse) and its original."""
    tmp = tmp_path_factory.mktemp("gqa")
    original = load_model(tiny_model_dir)
    loaded = load_model(tiny_model_dir)
    metrics = run_prune(loaded, cell(0.3, strategy="inverse"), tmp, StageCache(tmp / "home"))
    return original, loaded, metrics, tmp


def test_ratio_kept_output_equals_masked_original_and_artifacts(pruned_both):
    original, loaded, metrics, tmp = pruned_both
    model = loaded.model
    for layer in model.model.layers:
        attn = layer.self_attn
        heads, kv = attn.q_proj.out_features // HD, attn.k_proj.out_features // HD
        assert heads == G * kv and kv >= 1 and attn.o_proj.in_features == heads * HD
        assert attn.num_key_value_groups == G and attn.head_dim == HD
        assert 1 <= layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features
    assert sum(x.self_attn.k_proj.out_features for x in model.model.layers) < 4 * KV * HD
    x = ids()
    with torch.no_grad():
        got = model(input_ids=x).logits
        want = masked_copy(original.model, model)(input_ids=x).logits
        dense = original.model(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)
    # generate runs with per-layer head counts (the KV cache included)
    out = model.generate(x[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
    # artifacts and metrics
    art = tmp / "artifacts"
    assert (art / "pruning_strategy.png").stat().st_size > 1000
    rows = (art / "pruned_params.csv").read_text().splitlines()
    assert rows[0].startswith("layer,") and len(rows) == 1 + 4 + 1
    analysis = json.loads((art / "layer_importance.json").read_text())
    assert analysis["metric"] == "removal" and analysis["num_layers"] == 4
    before = sum(p.numel() for p in original.model.parameters())
    after = sum(p.numel() for p in model.parameters())
    assert metrics["weights.total_before"] == before
    assert metrics["weights.removed_share"] == pytest.approx((before - after) / before)


def test_save_load_round_trip_is_bit_identical(pruned_both, tmp_path):
    _, loaded, _, _ = pruned_both
    save_model(loaded, tmp_path / "model")
    shapes = json.loads((tmp_path / "model" / SHAPES_FILE).read_text())
    assert [s["num_key_value_heads"] for s in shapes["layers"]] == \
        [x.self_attn.k_proj.out_features // HD for x in loaded.model.model.layers]
    back = load_model(tmp_path / "model")
    x = ids(seed=1)
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=x).logits, loaded.model(input_ids=x).logits)
    assert torch.equal(back.model.generate(x[:1, :6], max_new_tokens=4, do_sample=False),
                       loaded.model.generate(x[:1, :6], max_new_tokens=4, do_sample=False))
    for (n1, p1), (n2, p2) in zip(back.model.state_dict().items(),
                                  loaded.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_lora_runs_on_pruned_model(pruned_both):
    from peft import LoraConfig, get_peft_model
    from sparselab.recover.lora import resolve_targets
    model = copy.deepcopy(pruned_both[1].model)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=resolve_targets(["attention", "mlp"]),
        task_type="CAUSAL_LM"))
    x = ids()
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("sparsity,options", [
    (0.25, {"importance": "magnitude", "layer_importance": "cosine"}),
    (0.3, {"importance": "magnitude", "layer_importance": "cosine", "mlp": False}),
    (0.4, {"importance": "magnitude", "layer_importance": "cosine", "attention": False,
           "strategy": "linear"}),
])
def test_reduction_within_one_group_and_magnitude_choice(tiny_model_dir, tmp_path, sparsity,
                                                         options):
    original = load_model(tiny_model_dir)
    loaded = load_model(tiny_model_dir)
    metrics = run_prune(loaded, cell(sparsity, **options), tmp_path)
    attention, mlp = options.get("attention", True), options.get("mlp", True)
    per_layer = (2 * HEADS * HD * HIDDEN + 2 * KV * HD * HIDDEN) * attention + \
        3 * HIDDEN * INTER * mlp
    removed = sum(p.numel() for p in original.model.parameters()) - \
        sum(p.numel() for p in loaded.model.parameters())
    group = (2 * G * HD + 2 * HD) * HIDDEN if attention else 3 * HIDDEN
    assert abs(removed - sparsity * 4 * per_layer) <= group
    assert metrics["prune.prunable_removed_share"] == pytest.approx(removed / (4 * per_layer))
    for i, layer in enumerate(original.model.model.layers):  # lowest-L2 units went
        a = layer.self_attn
        norms = torch.stack([
            a.q_proj.weight[j * G * HD:(j + 1) * G * HD].pow(2).sum()
            + a.k_proj.weight[j * HD:(j + 1) * HD].pow(2).sum()
            + a.v_proj.weight[j * HD:(j + 1) * HD].pow(2).sum()
            + a.o_proj.weight[:, j * G * HD:(j + 1) * G * HD].pow(2).sum() for j in range(KV)])
        kept = kept_groups(original.model, loaded.model, i)
        assert set(kept) == set(norms.argsort(descending=True)[:len(kept)].tolist())
        m = layer.mlp
        cn = m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + \
            m.down_proj.weight.pow(2).sum(0)
        kept = kept_channels(original.model, loaded.model, i)
        assert set(kept) == set(cn.argsort(descending=True)[:len(kept)].tolist())
        if not attention:
            assert len(kept_groups(original.model, loaded.model, i)) == KV
        if not mlp:
            assert len(kept) == INTER


def test_layer_range_keeps_outside_layers_intact(tiny_model_dir, tmp_path):
    original = load_model(tiny_model_dir)
    loaded = load_model(tiny_model_dir)
    run_prune(loaded, cell(0.5, importance="magnitude", layer_importance="cosine",
                           layer_range=[1, 3]), tmp_path)
    for i in (0, 3):
        a = original.model.model.layers[i].state_dict()
        b = loaded.model.model.layers[i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    for i in (1, 2):
        assert loaded.model.model.layers[i].self_attn.k_proj.out_features == HD


def test_taylor_scores_against_direct_gradients(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    x = ids(3, 16)
    scores = taylor_scores(loaded.model, x, [1], HD, G, True, True)
    model = copy.deepcopy(loaded.model)
    for row in x:
        model(input_ids=row[None], labels=row[None]).loss.backward()
    layer = model.model.layers[1]
    s = {n: (w.weight * w.weight.grad).abs().double() for n, w in
         [("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj),
          ("v", layer.self_attn.v_proj), ("o", layer.self_attn.o_proj),
          ("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj), ("down", layer.mlp.down_proj)]}
    q = [slice(j * G * HD, (j + 1) * G * HD) for j in range(KV)]
    kv = [slice(j * HD, (j + 1) * HD) for j in range(KV)]
    groups = torch.stack([s["q"][q[j]].sum() + s["k"][kv[j]].sum() + s["v"][kv[j]].sum()
                          + s["o"][:, q[j]].sum() for j in range(KV)])
    channels = s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)
    torch.testing.assert_close(scores[1][0], groups, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(scores[1][1], channels, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in loaded.model.parameters())  # left as it was


def test_layer_importance_against_direct_computation(tiny_model_dir):
    model = load_model(tiny_model_dir).model
    x = ids(3, 20)
    removal = li.analyse(model, x, "removal")
    cosine = li.analyse(model, x, "cosine")

    def mean_loss(m):
        with torch.no_grad():
            return sum(float(m(input_ids=r[None], labels=r[None]).loss) for r in x) / len(x)

    base = mean_loss(model)
    assert removal["details"]["base_loss"] == pytest.approx(base, abs=1e-5)
    for i in range(4):
        skipped = copy.deepcopy(model)
        skipped.model.layers = nn.ModuleList(
            layer for j, layer in enumerate(skipped.model.layers) if j != i)
        assert removal["importance"][i] == pytest.approx(mean_loss(skipped) - base, abs=1e-5)
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda _m, args, kwargs, out, i=i: seen.setdefault(i, []).append(
            (kwargs.get("hidden_states", args[0] if args else None), out)), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    for i in range(4):
        inp, out = seen[i][0]
        out = out[0] if isinstance(out, tuple) else out
        direct = float((1 - nn.functional.cosine_similarity(inp, out, dim=-1)).mean())
        assert cosine["importance"][i] == pytest.approx(direct, abs=1e-5)


def test_strategies_keep_mean_ratio_and_caps():
    importance = [5.0, 0.01, 0.2, 0.3, 0.05, 1.0]
    layers = list(range(6))
    caps = {i: 2 / 3 for i in layers}
    for strategy in ("uniform", "inverse", "linear"):
        for target in (0.15, 0.25, 0.35, 0.6):
            r = cap_ratios(raw_ratios(importance, target, strategy, layers, 0.8), caps, target,
                           strategy)
            assert sum(r.values()) / 6 == pytest.approx(target)
            assert all(0 <= v <= 2 / 3 + 1e-12 for v in r.values())
    inv = raw_ratios(importance, 0.25, "inverse", layers)
    assert inv[0] < inv[5] < inv[3] < inv[2] < inv[4] < inv[1]  # important layers pruned less
    lin = raw_ratios(importance, 0.25, "linear", layers, 0.5)
    assert lin[0] == pytest.approx(0.125) and lin[5] == pytest.approx(0.375)
    # counts: total = round(sum ratio * units), never the whole layer, ties to less important
    counts = allocate({i: 0.25 for i in layers}, {i: 3 for i in layers}, importance)
    assert sum(counts.values()) == 5 and max(counts.values()) == 1  # 4.5 rounds half up
    assert counts[0] == 0 and all(counts[i] == 1 for i in range(1, 6))
    counts = allocate({i: 0.2 for i in layers}, {i: 3 for i in layers}, importance)
    assert sum(counts.values()) == 4 and counts[0] == counts[5] == 0
    with pytest.raises(ValueError, match="every"):
        cap_ratios({i: 0.7 for i in layers}, caps, 0.7, "uniform")
    with pytest.raises(ValueError, match="at\\s+least one"):
        cap_ratios(raw_ratios(importance, 0.7, "inverse", layers), caps, 0.7, "inverse")


def test_layer_importance_is_cached_and_reusable_from_file(tiny_model_dir, tmp_path):
    cache = StageCache(tmp_path / "home")
    first = load_model(tiny_model_dir)
    m1 = run_prune(first, cell(0.25, importance="magnitude"), tmp_path / "a", cache)
    assert m1["prune.layer_importance_cached"] == 0.0
    key = config_hash({"model": "tiny", "metric": "removal", "calibration": {
        **cell().prune.calibration.model_dump(mode="json"),
        "source": resolve_data_dir("builtin").label}})
    entry = cache.entry("layer_importance", key)
    assert entry is not None and (entry.path / "layer_importance.json").is_file()
    second = load_model(tiny_model_dir)
    m2 = run_prune(second, cell(0.25, importance="magnitude"), tmp_path / "b", cache)
    assert m2["prune.layer_importance_cached"] == 1.0
    file = tmp_path / "a" / "artifacts" / "layer_importance.json"
    third = load_model(tiny_model_dir)
    run_prune(third, cell(0.25, importance="magnitude", layer_importance=str(file)),
              tmp_path / "c")
    assert (tmp_path / "b" / "artifacts" / "pruned_params.csv").read_text() == \
        (tmp_path / "c" / "artifacts" / "pruned_params.csv").read_text()


def test_bad_input_is_refused(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    method = GQAStructuredPruning()
    tiny_config = load_model(tiny_model_dir).model.config

    def refused(make, match, model_config=None):
        """`make()` builds the cell: an option error is the schema's, as the matrix is read."""
        with pytest.raises(ValueError, match=match):
            config = make()
            method.check(config.prune)
            method.check_model(config.prune, model_config or tiny_config)

    refused(lambda: cell(0.0), "sparsity is 0")
    refused(lambda: cell(0.25).model_copy(update={"prune": cell(0.25).prune.model_copy(
        update={"pattern": "2:4"})}), "no sparsity pattern")
    refused(lambda: cell(0.25, layer_range=[2, 9]), "outside the model's 4")
    refused(lambda: cell(0.25, layer_range=[3, 1]), "start < end")
    refused(lambda: cell(0.6), "every attention group.*of layer 0")
    refused(lambda: cell(0.6, strategy="inverse"), "at least one attention group")
    refused(lambda: cell(0.25, attention=False, mlp=False), "nothing to prune")
    refused(lambda: cell(0.25, importance="fisher"), "taylor")
    refused(lambda: cell(0.25, layer_importance="missing.json"), "not found")
    bad = write(tmp_path / "li.json", json.dumps({"importance": [1.0, 2.0, 3.0]}))
    refused(lambda: cell(0.25, layer_importance=str(bad)), "3 layers, the model 4")
    mha = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    refused(lambda: cell(0.25), "no grouped-query attention", mha)
    # and at prune start, before any work, on the model itself
    loaded = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    ctx = PruneContext(cell(0.6).prune, resolve_data_dir("builtin"), tmp_path / "art", LOG)
    with pytest.raises(ValueError, match="every attention group"):
        method.prune(loaded, ctx)
    ctx = PruneContext(cell(0.25, layer_importance=str(bad)).prune, resolve_data_dir("builtin"),
                       tmp_path / "art", LOG)
    with pytest.raises(ValueError, match="3 layers"):
        method.prune(loaded, ctx)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    model = LlamaForCausalLM(mha)
    with pytest.raises(ValueError, match="no grouped-query attention"):
        method.prune(type(loaded)(model, loaded.tokenizer),
                     PruneContext(cell(0.25).prune, resolve_data_dir("builtin"), tmp_path / "a", LOG))
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="KV-grouped"):
        method.prune(type(loaded)(gpt2, loaded.tokenizer),
                     PruneContext(cell(0.25).prune, resolve_data_dir("builtin"), tmp_path / "a", LOG))


def test_matrix_run_prune_recover_evaluate(workspace):
    """Through the runner: prune, LoRA on attention+MLP of the pruned model, perplexity."""
    from click.testing import CliRunner
    from sparselab.cli import main
    matrix = write(workspace / "gqa.yaml", """
name: gqa_tiny
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: gqa_structured, sparsity: 0.25, calibration: {samples: 4, seqlen: 32},
          options: {importance: taylor, layer_importance: cosine, strategy: linear}}
  recover:
    method: lora
    data: wikitext2
    lora: {r: 4, alpha: 8, dropout: 0.0, targets: [attention, mlp]}
    train: {samples: 8, seqlen: 32, batch_size: 4, grad_accum: 1}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64, max_windows: 4}, tasks: []}
""")
    result = CliRunner().invoke(main, ["run", str(matrix)])
    assert result.exit_code == 0, result.output
    models = list((workspace / "home" / "stages" / "prune").glob("*/model"))
    assert len(models) == 1 and (models[0] / SHAPES_FILE).is_file()
    analyses = workspace / "home" / "stages" / "layer_importance"
    assert list(analyses.glob("*/layer_importance.json"))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    exp = client.get_experiment_by_name("gqa_tiny")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("sparselab.cell") == "default"]
    metrics = runs[0].data.metrics
    assert metrics["weights.total"] < metrics["weights.total_before"]
    assert "wikitext2.ppl" in metrics and "wikitext2.ppl_pruned" in metrics


def test_shipped_matrix_validates_and_bad_options_are_refused(workspace):
    from click.testing import CliRunner
    from sparselab.cli import main
    shipped = REPO / "matrix" / "gqa_structured.yaml"
    text = shipped.read_text()
    assert "--data-dir ../shared/data" in text
    data = REPO.parent / "shared" / "data"
    if data.is_dir():
        result = CliRunner().invoke(main, ["validate", str(shipped), "--data-dir", str(data)])
        assert result.exit_code == 0, result.output
        assert "5 cells" in result.output
    bad = write(workspace / "bad.yaml", text.replace("pattern: unstructured ", "pattern: '2:4' "))
    result = CliRunner().invoke(main, ["validate", str(bad), "--data-dir", "builtin"])
    assert result.exit_code != 0 and "no sparsity pattern" in result.output
