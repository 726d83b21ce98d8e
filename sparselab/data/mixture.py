"""How a mixture's samples are split among its datasets (calibration and training alike)."""
from __future__ import annotations

import math


def apportion(samples: int, weights: dict[str, float]) -> dict[str, int]:
    """samples * weight per dataset, floored, then the samples left over go by largest
    remainder (ties: the dataset names in order), so the counts add up to `samples`."""
    total = sum(weights.values())
    exact = {name: samples * weight / total for name, weight in weights.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    short = samples - sum(counts.values())
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[:short]:
        counts[name] += 1
    return counts
