"""Wanda: prune by |weight| x input-activation norm (Sun et al. 2023, locuslab/wanda).

```yaml
prune:
  method: wanda
  sparsity: 0.5
  pattern: unstructured          # or "2:4", "4:8", block:16x16, tiers
  calibration: {data: wikitext2, samples: 128, seqlen: 512}
  layer_ratios: uniform          # or owl, or one ratio per decoder layer
  skip_layers: []                # decoder layers kept dense
  options:
    variant: false               # the paper's per-row cumulative-score threshold (unstructured)
    tiers: {ratios: [0.35, 0.45, 0.20], nm: "2:4", block: 16}   # pattern: tiers
    blocks: {group: matrix, normalize: false}   # block:RxC, tiers: or group: row / column
    owl: {M: 5, lambda: 0.08}                                   # layer_ratios: owl
```

The score of weight W_ij is |W_ij| * ||X_j||_2, where ||X_j||_2^2 sums the squared inputs of column j
over every calibration token, divided by the number of calibration sequences (the reference's
`scaler_row`). Scores are compared within each output row (per-row sparsity) for `unstructured`,
within each group of M for N:M, and for whole blocks (`block:BxB`, `tiers`) across the layer or
within each block-row or block-column (`options.blocks`, sparselab.prune.options.BlockOptions).
The statistics of all linears of a decoder layer come from one pass of that still-unpruned layer;
after pruning it the layer runs again, so the next layer is calibrated on pruned outputs.

`variant: true` (the paper's "Wanda variant", reference `return_given_alpha`): in each row, prune the
lowest-scored weights whose cumulative score stays below alpha times the row's total score, with one
alpha per weight matrix bisected in [0, 0.8] until its sparsity is within 0.001 of the target (or the
alpha interval is narrower than 0.001, as in the reference).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from sparselab.prune.layerwise import InputNorms, LayerwisePruning
from sparselab.prune.patterns import Pattern
from sparselab.prune.wanda.config import WandaOptions

log = logging.getLogger(__name__)


def variant_mask(scores: torch.Tensor, sparsity: float, tolerance: float = 0.001
                 ) -> tuple[torch.Tensor, float, float]:
    """Wanda variant: keep-mask, achieved sparsity and alpha (bisected in [0, 0.8])."""
    values, _ = torch.sort(scores, dim=1, stable=True)
    cumulative = torch.cumsum(values, dim=1)
    row_total = scores.sum(dim=1, keepdim=True)

    def at(alpha: float) -> tuple[torch.Tensor, float]:
        below = (cumulative <= row_total * alpha).sum(dim=1, keepdim=True)
        threshold = values.gather(1, (below - 1).clamp(min=0))
        threshold = torch.where(below > 0, threshold, torch.full_like(threshold, -float("inf")))
        pruned = scores <= threshold
        return pruned, float(pruned.float().mean())

    alpha, low, high = 0.4, 0.0, 0.8
    pruned, achieved = at(alpha)
    while abs(achieved - sparsity) > tolerance and high - low >= tolerance:
        if achieved > sparsity:
            high, alpha = alpha, (alpha + low) / 2
        else:
            low, alpha = alpha, (alpha + high) / 2
        pruned, achieved = at(alpha)
    return ~pruned, achieved, alpha


class WandaPruning(LayerwisePruning):
    Options = WandaOptions
    patterns = ("unstructured", "nm", "block", "tiers")

    def check(self, config) -> None:
        super().check(config)
        options = config.method_options
        if options.variant and Pattern.parse(config.pattern).kind != "unstructured":
            raise ValueError(f"options.variant applies to pattern 'unstructured' only, not "
                             f"'{config.pattern}'.")

    def new_stat(self, linear: nn.Linear) -> InputNorms:
        return InputNorms(linear.in_features, linear.weight.device)

    def prune_linear(self, name: str, linear: nn.Linear, stat: InputNorms, pattern: Pattern,
                     sparsity: float, options: WandaOptions) -> tuple[torch.Tensor, float]:
        weight = linear.weight
        scores = stat.scores(weight)
        rows = weight.shape[0]
        if pattern.kind == "unstructured" and options.variant:
            keep, achieved, alpha = variant_mask(scores, sparsity)
            if abs(achieved - sparsity) > 0.001:  # the reference accepts it too, silently
                log.warning("%s: Wanda variant reached sparsity %.4f (target %.4f) with alpha "
                            "%.4f at the end of its bisection", name, achieved, sparsity, alpha)
            slack = max(0.001, abs(achieved - sparsity)) * keep.numel()
        else:
            keep = pattern.mask(scores, sparsity, per_row=True)
            slack = rows
        weight.masked_fill_(~keep, 0)
        return keep, slack
