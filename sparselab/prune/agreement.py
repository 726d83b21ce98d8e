"""Whether the method or the calibration draw decides which weights go: the agreement of the masks
of one configuration pruned at several seeds (`sparselab report --masks`).

For two pruned models the agreement of a linear's masks is the Jaccard index of their pruned
sets, |A ∩ B| / |A ∪ B|: 1 when both seeds removed the same weights, about s / (2 − s) at
sparsity s when the removed weights were drawn independently (1/3 at 50%). Over R models it is
pooled over every pair (the intersections summed, over the unions summed), per decoder layer and
overall. Masks are read from the stage cache's saved models, one tensor at a time, and kept as
packed bits (135M weights: 17 MB a model).
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AFFECTS_RESULTS = False  # reads finished models for the report: sparselab.provenance leaves it out

DECODER_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\..+\.weight$")


def pruned_masks(folder: Path) -> dict[str, tuple[int, int, np.ndarray]]:
    """Decoder linear weight name -> (its decoder layer, its size, its zeros as packed bits),
    from a saved model folder's safetensors files."""
    from safetensors import safe_open
    masks = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():
                match = DECODER_LINEAR.search(name)
                if match is None:
                    continue
                weight = tensors.get_tensor(name)
                if weight.dim() == 2:
                    masks[name] = (int(match.group(1)), weight.numel(),
                                   np.packbits((weight == 0).numpy().reshape(-1)))
    return masks


@dataclass(frozen=True)
class MaskAgreement:
    models: int
    overall: float  # pooled Jaccard index of the pruned sets over every pair of models
    per_layer: dict[int, float]
    chance: float  # what independent draws at the models' mean sparsity would give


def mask_agreement(folders: list[Path]) -> MaskAgreement:
    """The pooled agreement of the masks of two or more pruned models of one shape."""
    if len(folders) < 2:
        raise ValueError("mask agreement needs at least two pruned models")
    models = [pruned_masks(folder) for folder in folders]
    names = sorted(set.intersection(*(set(m) for m in models)))
    if not names:
        raise ValueError("the models share no decoder linear to compare")
    inter: dict[int, int] = defaultdict(int)
    union: dict[int, int] = defaultdict(int)
    zeros = total = 0
    for name in names:
        layer, size = models[0][name][:2]
        bits = [m[name][2] for m in models]
        if len({b.shape for b in bits}) > 1:
            raise ValueError(f"{name} has different shapes in the models compared")
        for a, b in itertools.combinations(bits, 2):
            inter[layer] += int(np.bitwise_count(a & b).sum())
            union[layer] += int(np.bitwise_count(a | b).sum())
        zeros += sum(int(np.bitwise_count(b).sum()) for b in bits)
        total += len(bits) * size
    per_layer = {layer: inter[layer] / union[layer] if union[layer] else 1.0
                 for layer in sorted(union)}
    overall = sum(inter.values()) / sum(union.values()) if sum(union.values()) else 1.0
    sparsity = zeros / total
    return MaskAgreement(len(folders), overall, per_layer,
                         sparsity / (2 - sparsity) if sparsity < 1 else 1.0)
