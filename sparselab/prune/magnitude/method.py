"""Magnitude pruning: remove the weights of smallest |W| (the baseline of every pruning paper).

```yaml
prune:
  method: magnitude
  sparsity: 0.5
  pattern: unstructured   # or "2:4", block:16x16, tiers
  layer_ratios: uniform   # or one ratio per decoder layer (owl needs calibration scores: not here)
  skip_layers: []
  options:
    tiers: {ratios: [0.35, 0.45, 0.20], nm: "2:4", block: 16}   # pattern: tiers
    blocks: {group: matrix, normalize: false}   # block:RxC, tiers: or group: row / column
```
Unstructured magnitude compares weights across the whole layer, as in the Wanda and SparseGPT
papers' magnitude baselines; N:M, blocks and tiers compare within their groups (for blocks:
`options.blocks`, sparselab.prune.options.BlockOptions).
"""
from __future__ import annotations

import torch

from sparselab.models import LoadedModel
from sparselab.onload import execution_device, visiting
from sparselab.prune.base import PruneContext, PruningMethod
from sparselab.prune.layers import layer_index, prunable_linears
from sparselab.prune.magnitude.config import MagnitudeOptions
from sparselab.prune.owl import layer_sparsities
from sparselab.prune.patterns import Pattern, check_against_model
from sparselab.shapes import decoder_layers


class MagnitudePruning(PruningMethod):
    Options = MagnitudeOptions
    patterns = ("unstructured", "nm", "block", "tiers")
    onloads = True  # under --onload each decoder layer visits the accelerator for its masks

    def check(self, config) -> None:
        super().check(config)
        if config.layer_ratios == "owl":
            raise ValueError("layer_ratios: owl ranks layers by their Wanda scores, which need "
                             "calibration; method 'magnitude' has none. Use method wanda or "
                             "sparsegpt, or give an explicit list of ratios.")
        if config.layer_ratios != "uniform" and Pattern.parse(config.pattern).kind in ("nm",
                                                                                      "tiers"):
            raise ValueError(f"layer_ratios cannot be used with pattern '{config.pattern}': "
                             "N:M and tiers fix the sparsity of every layer.")

    def check_model(self, config, model_config) -> None:
        check_against_model(config, Pattern.of(config), model_config)

    @torch.no_grad()
    def prune(self, loaded: LoadedModel, ctx: PruneContext) -> dict[str, float]:
        config = ctx.config
        pattern = Pattern.of(config)
        sparsities = layer_sparsities(config, len(decoder_layers(loaded.model)))
        linears = prunable_linears(loaded.model)
        for name, linear in linears.items():
            pattern.check_shape(name, tuple(linear.weight.shape))
        by_layer: dict[int, dict[str, torch.nn.Module]] = {}
        for name, linear in linears.items():
            by_layer.setdefault(layer_index(name), {})[name] = linear
        layers, device = decoder_layers(loaded.model), execution_device(loaded.model)
        for index, named in by_layer.items():
            if index in config.skip_layers:
                continue
            with visiting([layers[index]], device):
                for name, linear in named.items():
                    weight = linear.weight
                    keep = pattern.mask(weight.abs().float(), sparsities[index], per_row=False)
                    weight.masked_fill_(~keep, 0)
                    pattern.verify(name, weight, keep, pattern.target(sparsities[index]),
                                   slack=1)
        return {}
