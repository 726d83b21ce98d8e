"""The pruning methods against small independent computations, and their invariants, on tiny-llama."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from sparselab.data.catalog import resolve_data_dir
from sparselab.matrix import CellConfig
from sparselab.prune.base import PruneContext
from sparselab.prune.calibration import calibration_set
from sparselab.prune.layers import layer_index, prunable_linears
from sparselab.prune.options import BlockOptions, TierOptions
from sparselab.prune.owl import owl_ratios
from sparselab.prune.patterns import (DENSE_TIER, NM_TIER, REMOVED_TIER, Pattern, PatternViolation,
                                      block_mask, block_tiers, expand_blocks, tier_counts,
                                      tiers_mask)
from sparselab.prune.sparsegpt.method import sparsegpt_prune
from sparselab.registry import PRUNING
from sparselab.shapes import decoder_layers

torch.set_num_threads(2)
LOG = logging.getLogger("test")
CALIB = {"samples": 8, "seqlen": 64}


def cell(method: str, **prune) -> CellConfig:
    prune = {"method": method, "sparsity": 0.5, "calibration": CALIB, **prune}
    return CellConfig.model_validate({"model": "tiny-llama", "data_dir": "builtin", "prune": prune})


def run_prune(loaded, config: CellConfig, tmp_path) -> dict:
    method = PRUNING.get(config.prune.method)()
    method.check(config.prune)
    ctx = PruneContext(config.prune, resolve_data_dir("builtin"), tmp_path / "artifacts", LOG)
    return method.prune(loaded, ctx)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def layer_sparsity(model, index: int) -> float:
    linears = [l for n, l in prunable_linears(model).items() if layer_index(n) == index]
    return sum(int((l.weight == 0).sum()) for l in linears) / sum(l.weight.numel() for l in linears)


@torch.no_grad()
def inputs_of(model, module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The inputs `module` receives in ordinary forward passes, one sample at a time."""
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    try:
        for row in input_ids:
            model(input_ids=row[None], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)  # samples x seqlen x in


def wanda_keep_direct(weight: torch.Tensor, x: torch.Tensor, sparsity: float):
    """Wanda from its definition: |W| * sqrt(sum_tokens x^2 / sequences), lowest per row pruned."""
    norms = (x.double() ** 2).sum(dim=(0, 1)) / x.shape[0]
    scores = weight.double().abs() * norms.sqrt()[None, :]
    k = int(weight.shape[1] * sparsity)
    order = scores.argsort(dim=1, stable=True)
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep, scores, order, k


def assert_same_mask(got: torch.Tensor, want: torch.Tensor, scores, order, k) -> None:
    """Equal masks, allowing only float near-ties at the row threshold to differ."""
    differ = got != want
    if differ.any():
        threshold = scores.gather(1, order[:, k - 1:k + 1]).mean(dim=1, keepdim=True)
        close = (scores - threshold).abs() <= 1e-5 * threshold.abs()
        assert bool(close[differ].all()), f"{int(differ.sum())} mask entries differ"
        assert int(differ.sum()) <= 4


# --- Wanda ---------------------------------------------------------------------------------------

def test_wanda_masks_follow_the_formula_on_sequential_inputs(tiny_model_dir, tmp_path):
    from sparselab.models import load_model
    dense = load_model(tiny_model_dir)
    config = cell("wanda")
    calib = calibration_set(dense.tokenizer, config.prune.calibration, resolve_data_dir("builtin"))
    layers = decoder_layers(dense.model)
    x_q0 = inputs_of(dense.model, layers[0].self_attn.q_proj, calib.input_ids)
    x_down0 = inputs_of(dense.model, layers[0].mlp.down_proj, calib.input_ids)
    x_q1_dense = inputs_of(dense.model, layers[1].self_attn.q_proj, calib.input_ids)
    original = weights(dense.model)

    pruned = load_model(tiny_model_dir)
    run_prune(pruned, config, tmp_path)
    player = decoder_layers(pruned.model)
    # layer 0: q_proj and down_proj both from one pass of the unpruned layer
    for name, x in (("self_attn.q_proj", x_q0), ("mlp.down_proj", x_down0)):
        w = original[f"model.layers.0.{name}.weight"]
        keep, scores, order, k = wanda_keep_direct(w, x, 0.5)
        got = pruned.model.get_submodule(f"model.layers.0.{name}").weight != 0
        assert_same_mask(got, keep, scores, order, k)
        kept = got & keep
        assert torch.equal(pruned.model.get_submodule(f"model.layers.0.{name}").weight[kept],
                           w[kept])  # Wanda never updates the kept weights
    # layer 1 is calibrated on the outputs of the pruned layer 0, not on dense ones
    x_q1 = inputs_of(pruned.model, player[1].self_attn.q_proj, calib.input_ids)
    w1 = original["model.layers.1.self_attn.q_proj.weight"]
    keep, scores, order, k = wanda_keep_direct(w1, x_q1, 0.5)
    got = player[1].self_attn.q_proj.weight != 0
    assert_same_mask(got, keep, scores, order, k)
    keep_dense, *_ = wanda_keep_direct(w1, x_q1_dense, 0.5)
    assert not torch.equal(got, keep_dense)
    # per-row sparsity: exactly half of every row
    for linear in prunable_linears(pruned.model).values():
        assert bool(((linear.weight == 0).sum(dim=1) == linear.weight.shape[1] // 2).all())


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_wanda_nm_holds_in_every_group(tiny, tmp_path, pattern, n, m):
    run_prune(tiny, cell("wanda", pattern=pattern), tmp_path)
    for name, linear in prunable_linears(tiny.model).items():
        w = linear.weight
        nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(dim=2)
        assert bool((nonzero == n).all()), name


def test_wanda_blocks_are_whole_and_lowest_scored(tiny, tmp_path):
    run_prune(tiny, cell("wanda", pattern="block:16x16", sparsity=0.25), tmp_path)
    for name, linear in prunable_linears(tiny.model).items():
        rows, cols = linear.weight.shape
        zeros = (linear.weight == 0).reshape(rows // 16, 16, cols // 16, 16).sum(dim=(1, 3))
        assert bool(((zeros == 0) | (zeros == 256)).all()), name
        assert int((zeros == 256).sum()) == int(zeros.numel() * 0.25), name


def test_tiers_on_tiny_llama(tiny, tmp_path):
    opts = {"tiers": {"ratios": [0.25, 0.5, 0.25], "nm": "2:4", "block": 16}}
    run_prune(tiny, cell("wanda", pattern="tiers", options=opts), tmp_path)
    for name, linear in prunable_linears(tiny.model).items():
        rows, cols = linear.weight.shape
        nz = (linear.weight != 0).reshape(rows // 16, 16, cols // 16, 16).sum(dim=(1, 3))
        blocks = nz.numel()
        assert int((nz == 256).sum()) == round(blocks * 0.25), name
        assert int((nz == 128).sum()) == blocks - 2 * round(blocks * 0.25), name
        assert int((nz == 0).sum()) == round(blocks * 0.25), name
        # the N:M blocks hold 2:4 in each group
        groups = (linear.weight != 0).reshape(rows, cols // 4, 4).sum(dim=2)
        assert bool(((groups == 0) | (groups == 2) | (groups == 4)).all())
    # 0.5 * 0.5 + 0.25 = 0.5 overall
    zeros = sum(int((l.weight == 0).sum()) for l in prunable_linears(tiny.model).values())
    total = sum(l.weight.numel() for l in prunable_linears(tiny.model).values())
    assert zeros / total == pytest.approx(0.5)


def test_tiers_mask_against_direct_ranking():
    torch.manual_seed(0)
    scores = torch.rand(32, 64)
    tiers = TierOptions(ratios=(0.35, 0.45, 0.20), nm="2:4", block=8)
    assert tiers.sparsity == pytest.approx(0.425)
    keep = tiers_mask(scores, tiers)
    block_sum = scores.reshape(4, 8, 8, 8).sum(dim=(1, 3)).flatten()
    rank = block_sum.argsort(descending=True)
    dense, nm, removed = tier_counts(32, tiers.ratios)
    assert (dense, nm, removed) == (11, 15, 6)  # round(11.2), rest, round(6.4)
    kept = keep.reshape(4, 8, 8, 8).sum(dim=(1, 3)).flatten()
    assert bool((kept[rank[:dense]] == 64).all())
    assert bool((kept[rank[dense:dense + nm]] == 32).all())
    assert bool((kept[rank[dense + nm:]] == 0).all())
    # inside an N:M block the two highest of each 4 survive
    b = int(rank[dense])
    r, c = divmod(b, 8)
    rows, cols = slice(r * 8, (r + 1) * 8), slice(c * 8, (c + 1) * 8)
    sub_s, sub_k = scores[rows, cols], keep[rows, cols]
    top2 = sub_s.reshape(8, 2, 4).topk(2, dim=2).indices
    assert bool(sub_k.reshape(8, 2, 4).gather(2, top2).all())


def test_wanda_variant_hits_target_per_layer(tiny, tmp_path):
    run_prune(tiny, cell("wanda", sparsity=0.6, options={"variant": True}), tmp_path)
    for name, linear in prunable_linears(tiny.model).items():
        achieved = float((linear.weight == 0).float().mean())
        assert abs(achieved - 0.6) <= 0.001 + 1e-9, name
        # the rows differ in sparsity (a cumulative-score threshold, not a fixed count)
        assert len(set((linear.weight == 0).sum(dim=1).tolist())) > 1, name


def test_determinism_and_seed(tiny_model_dir, tmp_path):
    from sparselab.models import load_model
    runs = []
    for seed in (0, 0, 1):
        loaded = load_model(tiny_model_dir)
        config = cell("wanda")
        config = config.model_copy(update={"prune": config.prune.model_copy(update={
            "calibration": config.prune.calibration.model_copy(update={"seed": seed})})})
        run_prune(loaded, config, tmp_path / str(len(runs)))
        fingerprint = json.loads((tmp_path / str(len(runs)) / "artifacts" / "calibration.json")
                                 .read_text())
        runs.append((weights(loaded.model), fingerprint["sha256"]))
    (w0, h0), (w1, h1), (w2, h2) = runs
    assert h0 == h1 != h2
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_skip_layers_stay_bit_identical(tiny, tmp_path, method):
    before = weights(tiny.model)
    run_prune(tiny, cell(method, skip_layers=[1, 3]), tmp_path)
    after = weights(tiny.model)
    for name in before:
        if ".layers.1." in name or ".layers.3." in name or "layers" not in name:
            assert torch.equal(before[name], after[name]), name
    assert layer_sparsity(tiny.model, 0) == pytest.approx(0.5, abs=0.01)
    assert layer_sparsity(tiny.model, 2) == pytest.approx(0.5, abs=0.01)
    assert layer_sparsity(tiny.model, 1) == 0.0


# --- layer ratios --------------------------------------------------------------------------------

def test_owl_ratios_formula():
    shares = [1.0, 3.0, 2.0, 6.0, 4.0]
    ratios = owl_ratios(shares, target=0.6, lam=0.08)
    assert sum(ratios) / len(ratios) == pytest.approx(0.6)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)  # span 2 * lambda
    assert all(0.6 - 0.16 <= r <= 0.6 + 0.16 for r in ratios)
    # more outliers -> pruned less
    assert sorted(range(5), key=lambda i: ratios[i]) == sorted(range(5), key=lambda i: -shares[i])
    # by hand: density = (s - 1) / 5 * 0.16 -> [0, .064, .032, .16, .096], mean .0704
    assert ratios[0] == pytest.approx(0.6 + 0.0704)
    assert owl_ratios([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]
    # evenly spread shares stay within target +- lambda
    even = owl_ratios([1.0, 2.0, 3.0], 0.5, 0.08)
    assert even == pytest.approx([0.58, 0.5, 0.42])


def test_owl_on_tiny_llama(tiny, tmp_path):
    lam = 0.1
    run_prune(tiny, cell("wanda", sparsity=0.5, layer_ratios="owl",
                         options={"owl": {"M": 3, "lambda": lam}}), tmp_path)
    saved = json.loads((tmp_path / "artifacts" / "layer_ratios.json").read_text())
    ratios, shares = saved["layer_ratios"], saved["outlier_shares"]
    assert sum(ratios) / 4 == pytest.approx(0.5)
    assert max(ratios) - min(ratios) == pytest.approx(2 * lam)
    assert all(0.5 - 2 * lam <= r <= 0.5 + 2 * lam for r in ratios)
    assert ratios == pytest.approx(owl_ratios(shares, 0.5, lam))
    assert ratios.index(min(ratios)) == shares.index(max(shares))
    for index, ratio in enumerate(ratios):  # per-row rounding: at most 1/64 below the ratio
        assert ratio - 1 / 64 <= layer_sparsity(tiny.model, index) <= ratio + 1e-9


def test_explicit_layer_ratios(tiny, tmp_path):
    ratios = [0.2, 0.4, 0.6, 0.75]
    run_prune(tiny, cell("magnitude", layer_ratios=ratios), tmp_path)
    for index, ratio in enumerate(ratios):
        assert layer_sparsity(tiny.model, index) == pytest.approx(ratio, abs=1e-3)


def test_explicit_ratio_list_of_wrong_length(tiny, tmp_path):
    with pytest.raises(ValueError, match="4 decoder layers"):
        run_prune(tiny, cell("wanda", layer_ratios=[0.5, 0.5]), tmp_path)


# --- block comparison groups ----------------------------------------------------------------------

def direct_block_ranks(scores, b, group, normalize):
    """Per comparison group, the (row, column) indices of its b x b blocks, highest summed score
    first, written out with loops."""
    if normalize:
        scores = scores / scores.mean(dim=0, keepdim=True)
    rows, cols = scores.shape[0] // b, scores.shape[1] // b
    total = {(r, c): float(scores[r * b:(r + 1) * b, c * b:(c + 1) * b].sum())
             for r in range(rows) for c in range(cols)}
    if group == "matrix":
        groups = [list(total)]
    elif group == "row":
        groups = [[(r, c) for c in range(cols)] for r in range(rows)]
    else:
        groups = [[(r, c) for r in range(rows)] for c in range(cols)]
    return [sorted(g, key=lambda rc: -total[rc]) for g in groups]


@pytest.mark.parametrize("group", ["matrix", "row", "column"])
@pytest.mark.parametrize("normalize", [False, True])
def test_block_groups_against_direct_ranking(group, normalize):
    torch.manual_seed(0)
    scores = torch.rand(32, 64) * torch.rand(64) ** 4  # inputs of very different scales
    blocks = BlockOptions(group=group, normalize=normalize)
    keep = block_mask(scores, 0.5, 8, 8, blocks)
    kept = keep.reshape(4, 8, 8, 8).sum(dim=(1, 3))
    for ranked in direct_block_ranks(scores, 8, group, normalize):
        cut = len(ranked) - int(len(ranked) * 0.5)
        assert all(kept[rc] == 64 for rc in ranked[:cut]) and all(kept[rc] == 0
                                                                  for rc in ranked[cut:])
    Pattern.parse("block:8x8", blocks=blocks).verify("x", scores * keep, keep, 0.5, slack=0)
    emptied = int((~keep).all(dim=0).sum())
    if group == "column":
        assert emptied == 0  # every input keeps half of its blocks


@pytest.mark.parametrize("group", ["row", "column"])
def test_tiers_groups_against_direct_ranking(group):
    torch.manual_seed(1)
    scores = torch.rand(32, 64)
    tiers = TierOptions(ratios=(0.25, 0.5, 0.25), nm="2:4", block=8)
    blocks = BlockOptions(group=group)
    keep = tiers_mask(scores, tiers, blocks)
    kept = keep.reshape(4, 8, 8, 8).sum(dim=(1, 3))
    for ranked in direct_block_ranks(scores, 8, group, False):
        dense, nm, removed = tier_counts(len(ranked), tiers.ratios)
        assert [int(kept[rc]) for rc in ranked] == [64] * dense + [32] * nm + [0] * removed
    pattern = Pattern.parse("tiers", tiers, blocks)
    pattern.verify("x", scores * keep, keep, tiers.sparsity, slack=0)
    ranked_across = tiers_mask(scores, tiers)  # the matrix-wide ranking breaks the group counts
    with pytest.raises(PatternViolation, match=f"in a {group} group"):
        pattern.verify("x", scores * ranked_across, ranked_across, tiers.sparsity, slack=0)


def test_block_groups_on_tiny_llama(tiny, tmp_path):
    opts = {"blocks": {"group": "column"}}
    run_prune(tiny, cell("wanda", pattern="block:16x16", options=opts), tmp_path)
    for name, linear in prunable_linears(tiny.model).items():
        rows, cols = linear.weight.shape
        zeros = (linear.weight == 0).reshape(rows // 16, 16, cols // 16, 16).sum(dim=(1, 3))
        assert bool(((zeros == 256).sum(dim=0) == int(rows // 16 * 0.5)).all()), name


# --- SparseGPT -----------------------------------------------------------------------------------

def sparsegpt_direct(w, x, sparsity, blocksize, nm=None, percdamp=0.01, blocks=None):
    """SparseGPT written out plainly in float64: explicit inverse, one column at a time, the inverse
    of the remaining columns updated by Gaussian elimination, every later column updated at once.
    `blocks`: a block:RxC / tiers Pattern, its blocks ranked by summed w^2 / [H^-1]_cc, up front
    (matrix, row groups) or as each lazy-update block is reached (column groups)."""
    W = w.double().clone()
    cols = W.shape[1]
    H = 2 * x.double().T @ x.double() / 4
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    keep = torch.ones_like(W, dtype=torch.bool)
    in_nm = torch.zeros_like(keep) if blocks is not None else torch.ones_like(keep)
    if blocks is not None and blocks.kind == "tiers":
        nm = blocks.tiers.nm_args

    def block_choice(c, end):
        diag = torch.stack([_remaining_diag(Hinv, c, j) for j in range(c, end)])
        scores = (W[:, c:end] ** 2 / diag).float()
        if blocks.kind == "tiers":
            b = blocks.tiers.block
            tier = expand_blocks(block_tiers(scores, blocks.tiers, blocks.blocks), b, b)
        else:
            tier = torch.where(block_mask(scores, sparsity, *blocks.args, blocks.blocks),
                               DENSE_TIER, REMOVED_TIER)
        keep[:, c:end] = tier != REMOVED_TIER
        in_nm[:, c:end] = tier == NM_TIER

    if blocks is not None and blocks.blocks.group != "column":
        block_choice(0, cols)
    for c in range(cols):
        d = Hinv[c, c]
        if blocks is not None and blocks.blocks.group == "column" and c % blocksize == 0:
            block_choice(c, min(c + blocksize, cols))
        if blocks is None and nm is None and c % blocksize == 0:
            end = min(c + blocksize, cols)
            diag = torch.stack([_remaining_diag(Hinv, c, j) for j in range(c, end)])
            block = W[:, c:end] ** 2 / diag
            k = int(block.numel() * sparsity)
            drop = block.flatten().argsort()[:k]
            flat = torch.ones(block.numel(), dtype=torch.bool)
            flat[drop] = False
            keep[:, c:end] = flat.view_as(block)
        if nm is not None and c % nm[1] == 0:
            n, m = nm
            diag = torch.stack([_remaining_diag(Hinv, c, j) for j in range(c, c + m)])
            group = W[:, c:c + m] ** 2 / diag
            drop = group.argsort(dim=1)[:, :m - n]
            chosen = torch.ones_like(group, dtype=torch.bool).scatter_(1, drop, False)
            keep[:, c:c + m] = torch.where(in_nm[:, c:c + m], chosen, keep[:, c:c + m])
        q = W[:, c] * keep[:, c]
        err = (W[:, c] - q) / d
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]
        W[:, c] = q
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / d  # eliminate column c
    return W, keep


def _remaining_diag(Hinv, c, j):
    """[H^-1]_jj after eliminating columns c..j-1 (what the Cholesky factor's U_jj^2 holds)."""
    sub = Hinv.clone()
    for i in range(c, j):
        sub = sub - sub[:, i:i + 1] @ sub[i:i + 1, :] / sub[i, i]
    return sub[j, j]


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_equals_direct_obs(nm):
    torch.manual_seed(0)
    w = torch.randn(12, 24)
    x = torch.randn(4 * 20, 24) @ torch.randn(24, 24) * 0.5  # correlated inputs
    x[:, 5] = 0  # a dead input column
    H = 2 * x.T @ x / 4  # 4 "sequences" of 20 tokens
    got, keep, _ = sparsegpt_prune(w, H, 0.5, nm=nm, blocksize=8)
    want, want_keep = sparsegpt_direct(w, x, 0.5, blocksize=8, nm=nm)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    assert bool((got[:, 5] == 0).all())
    # the update matters: it beats zeroing the same weights without it
    plain = w * keep
    plain[:, 5] = 0
    assert ((x @ (w - got).T) ** 2).sum() < 0.9 * ((x @ (w - plain).T) ** 2).sum()


@pytest.mark.parametrize("text,group", [("block:4x4", "matrix"), ("block:4x4", "row"),
                                        ("block:4x4", "column"), ("tiers", "matrix"),
                                        ("tiers", "column")])
def test_sparsegpt_with_blocks_equals_direct_obs(text, group):
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    x = torch.randn(4 * 20, 24) @ torch.randn(24, 24) * 0.5
    H = 2 * x.T @ x / 4
    tiers = TierOptions(ratios=(0.25, 0.5, 0.25), nm="2:4", block=4)
    pattern = Pattern.parse(text, tiers, BlockOptions(group=group))
    got, keep, _ = sparsegpt_prune(w, H, 0.5, blocksize=8, blocks=pattern)
    want, want_keep = sparsegpt_direct(w, x, 0.5, blocksize=8, blocks=pattern)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    pattern.verify("w", got, keep, pattern.target(0.5), slack=0)  # whole blocks, exact counts
    plain = w * keep  # the update lowers the output error of the same mask
    assert ((x @ (w - got).T) ** 2).sum() < 0.9 * ((x @ (w - plain).T) ** 2).sum()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:16x16"])
def test_sparsegpt_on_tiny_llama(tiny, tmp_path, pattern):
    before = weights(tiny.model)
    options = {"blocksize": 32, **({"blocks": {"group": "row"}} if "block" in pattern else {})}
    run_prune(tiny, cell("sparsegpt", pattern=pattern, options=options), tmp_path)
    for name, linear in prunable_linears(tiny.model).items():
        w = linear.weight
        assert float((w == 0).float().mean()) == pytest.approx(0.5), name
        if pattern == "2:4":
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(dim=2) == 2).all()), name
        kept = w != 0
        assert not torch.equal(w[kept], before[name + ".weight"][kept])  # OBS updated them


def test_bfloat16(tiny_model_dir, tmp_path):
    from sparselab.models import load_model
    for method, pattern in (("wanda", "unstructured"), ("sparsegpt", "2:4")):
        loaded = load_model(tiny_model_dir, dtype="bfloat16")
        run_prune(loaded, cell(method, pattern=pattern), tmp_path / method)
        for name, linear in prunable_linears(loaded.model).items():
            assert linear.weight.dtype == torch.bfloat16
            assert float((linear.weight == 0).float().mean()) >= 0.5, name


# --- validation and invariants -------------------------------------------------------------------

@pytest.mark.parametrize("method,prune,message", [
    ("magnitude", {"layer_ratios": "owl"}, "calibration"),
    ("wanda", {"layer_ratios": "owl", "pattern": "2:4"}, "fix the sparsity"),
    ("wanda", {"pattern": "tiers", "options": {"tiers": {"ratios": [0.5, 0.4, 0.2]}}}, "sum to 1"),
    ("wanda", {"pattern": "tiers", "options": {"tiers": {"block": 6}}}, "multiple of M"),
    ("wanda", {"pattern": "tiers", "options": {"tiers": {"nm": "block:2x2"}}}, "N:M"),
    ("wanda", {"pattern": "2:4", "options": {"variant": True}}, "unstructured"),
    ("wanda", {"options": {"varient": True}}, "varient"),
    ("sparsegpt", {"pattern": "block:16x16", "options": {"blocksize": 40}}, "block width 16"),
    ("sparsegpt", {"pattern": "tiers",
                   "options": {"per_row": True, "tiers": {"ratios": [0.25, 0.5, 0.25]}}},
     "unstructured"),
    ("wanda", {"options": {"blocks": {"group": "row"}}}, "has no blocks"),
    ("magnitude", {"pattern": "block:4x4", "options": {"blocks": {"group": "rows"}}}, "column"),
    ("sparsegpt", {"pattern": "4:8", "options": {"blocksize": 36}}, "multiple of M"),
])
def test_check_rejects(method, prune, message):
    with pytest.raises(ValueError, match=message):
        PRUNING.get(method)().check(cell(method, **prune).prune)


@pytest.mark.parametrize("method,prune,message", [
    ("wanda", {"pattern": "block:24x24"}, "does not divide"),
    ("magnitude", {"pattern": "3:5", "sparsity": 0.4}, "not divisible by M=5"),
    ("wanda", {"skip_layers": [7]}, "out of range"),
])
def test_prune_time_errors_name_the_problem(tiny, tmp_path, method, prune, message):
    with pytest.raises(ValueError, match=message):
        run_prune(tiny, cell(method, **prune), tmp_path)


def test_verify_catches_violations():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    nm = Pattern.parse("2:4")
    keep = nm.mask(w.abs(), 0.5, per_row=True)
    pruned = w * keep
    nm.verify("x", pruned, keep, 0.5, slack=0)
    broken = pruned.clone()
    broken[~keep] = 1.0
    with pytest.raises(PatternViolation, match="not zero"):
        nm.verify("x", broken, keep, 0.5, slack=0)
    bad_keep = keep.clone()
    bad_keep[0, :4] = True
    with pytest.raises(PatternViolation, match="2:4"):
        nm.verify("x", w * bad_keep, bad_keep, 0.5, slack=0)
    block = Pattern.parse("block:4x4")
    partial = torch.ones(8, 16, dtype=torch.bool)
    partial[:4, :4] = False
    partial[0, 0] = True
    with pytest.raises(PatternViolation, match="partly"):
        block.verify("x", w * partial, partial, 1 / 8, slack=0)
    unstructured = Pattern.parse("unstructured")
    few = torch.ones(8, 16, dtype=torch.bool)
    few[0, :3] = False
    with pytest.raises(PatternViolation, match="target"):
        unstructured.verify("x", w * few, few, 0.5, slack=8)


def test_check_model_uses_the_config_before_any_weights(tiny_model_dir, tiny):
    from transformers import AutoConfig

    from sparselab.prune.layers import linear_modules, linear_shapes
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    layer = decoder_layers(tiny.model)[0]
    assert linear_shapes(model_config) == {name: tuple(linear.weight.shape)
                                           for name, linear in linear_modules(layer).items()}
    for method, prune, message in [("wanda", {"pattern": "block:24x24"}, "does not divide"),
                                   ("magnitude", {"pattern": "3:5", "sparsity": 0.4}, "divisible by M=5"),
                                   ("sparsegpt", {"layer_ratios": [0.5] * 3}, "4 decoder layers"),
                                   ("wanda", {"skip_layers": [4]}, "out of range")]:
        with pytest.raises(ValueError, match=message):
            PRUNING.get(method)().check_model(cell(method, **prune).prune, model_config)
    PRUNING.get("wanda")().check_model(cell("wanda", pattern="tiers").prune, model_config)


@torch.no_grad()
def test_emptied_inputs_are_reported_per_kind_of_linear(tiny):
    from sparselab.prune.layers import sparsity_report
    linears = prunable_linears(tiny.model)
    down = linears["model.layers.0.mlp.down_proj"]
    down.weight[:, :3] = 0
    down.weight[1:, 3] = 0  # one weight left: this input is still read
    per_layer, overall = sparsity_report(tiny.model)
    downs = [n for n in linears if n.endswith("down_proj")]
    columns = sum(linears[n].in_features for n in downs)
    assert overall["sparsity.emptied_inputs.down_proj"] == pytest.approx(3 / columns)
    assert overall["sparsity.emptied_inputs.up_proj"] == 0.0
    total = sum(linear.in_features for linear in linears.values())
    assert overall["sparsity.emptied_inputs"] == pytest.approx(3 / total)
    assert per_layer["model.layers.0.mlp.down_proj"]["emptied_inputs"] == \
        pytest.approx(3 / down.in_features)
