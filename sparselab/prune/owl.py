"""Per-layer sparsity ratios: uniform, an explicit list, or OWL (outlier-weighed layerwise sparsity).

```yaml
prune:
  method: wanda            # or sparsegpt (OWL needs calibration scores; magnitude has none)
  sparsity: 0.7
  layer_ratios: owl        # uniform (default) | owl | [0.6, 0.65, ...] (one per decoder layer)
  options:
    owl: {M: 5, lambda: 0.08}
```

OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity", the `prune_wanda_outlier` code of
luuyin/OWL): a first pass over the dense model (each layer's calibration inputs are the dense
outputs of the layer before) computes, per decoder layer, the share D_l of Wanda scores
|W_ij| * ||X_j||_2 over all linears of the layer that exceed M times the layer's mean score. Then,
as in the reference code,

    density_l  = (D_l - min D) / (max D - min D) * 2 * lambda
    density_l  = density_l - mean(density) + (1 - target)
    sparsity_l = 1 - density_l          (clamped to 0.01 when it would be <= 0, as the reference)

so layers with more outliers are pruned less, the ratios span exactly 2 * lambda, and their mean is
the target. (The paper words this as sparsity within [target - lambda, target + lambda]; the code,
followed here, guarantees the span and the mean, which keeps every ratio within
[target - 2 lambda, target + 2 lambda], and within +-lambda whenever the outlier shares are spread
evenly.) Layers in `skip_layers` stay dense and take no part: the mean over the pruned layers is
the target. When every layer has the same outlier share the ratios are uniform.
"""
from __future__ import annotations

import torch

from sparselab.matrix import Prune
from sparselab.prune.options import OwlOptions


def outlier_share(scores: list[torch.Tensor], M: float) -> float:
    """Share (in %) of the scores above M times their mean (the reference `check_outlier_mean`)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > flat.mean() * M).sum()) / flat.numel() * 100


def owl_ratios(outlier_shares: list[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsity from per-layer outlier shares (see the module docstring)."""
    if not outlier_shares:
        return []
    shares = torch.tensor(outlier_shares, dtype=torch.float64)
    spread = shares.max() - shares.min()
    if float(spread) == 0.0:
        return [target] * len(outlier_shares)
    density = (shares - shares.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - target)
    sparsity = 1 - density
    return [0.01 if s <= 0 else float(s) for s in sparsity]


def validate_ratios(config: Prune, num_layers: int) -> None:
    """The checks that need the model: explicit-list length and skip_layers range."""
    ratios = config.layer_ratios
    if isinstance(ratios, list) and len(ratios) != num_layers:
        raise ValueError(f"prune.layer_ratios lists {len(ratios)} ratios but the model has "
                         f"{num_layers} decoder layers; give one ratio per decoder layer.")
    bad = [i for i in config.skip_layers if i >= num_layers]
    if bad:
        raise ValueError(f"prune.skip_layers {bad} out of range: the model has {num_layers} "
                         f"decoder layers (0..{num_layers - 1}).")


def layer_sparsities(config: Prune, num_layers: int,
                     owl_shares: list[float] | None = None,
                     owl: OwlOptions | None = None) -> list[float]:
    """Sparsity of every decoder layer (0 for skipped layers); OWL needs the outlier shares."""
    validate_ratios(config, num_layers)
    skip = set(config.skip_layers)
    pruned = [i for i in range(num_layers) if i not in skip]
    ratios = [0.0] * num_layers
    if config.layer_ratios == "uniform":
        for i in pruned:
            ratios[i] = config.sparsity
    elif config.layer_ratios == "owl":
        if owl_shares is None:
            raise ValueError("layer_ratios: owl needs the outlier shares of the layers")
        owl = owl or OwlOptions()
        for i, r in zip(pruned, owl_ratios([owl_shares[i] for i in pruned], config.sparsity,
                                           owl.lam)):
            ratios[i] = r
    else:
        for i in pruned:
            ratios[i] = float(config.layer_ratios[i])
    return ratios
