"""Paired comparisons of two cells scored on the same examples, and multiple-testing corrections.

Every cell of a matrix answers the same questions and is scored on the same perplexity windows,
so a difference between two cells is judged on the examples both scored (`paired`):

- 0/1 scores (accuracy, exact match; any metric whose scores take two values, 0 and its full
  score) get the exact McNemar test: under no difference, each discordant example is a fair coin.
- graded scores (F1, answer loss, window loss) get a paired permutation test: under no
  difference, the two cells' scores of an example are exchangeable, so each pair is swapped
  with probability 1/2 (all 2^n swaps when that is at most `resamples`, else a seeded sample).
- Δ's confidence interval: for 0/1 scores the Agresti–Min interval of a paired difference of
  proportions; otherwise a paired bootstrap (examples resampled together, seeded), for any
  aggregate (a mean, or perplexity's exp of the mean window loss).

`unpaired` is the fallback for runs without per-example scores: a z-test on the two standard
errors, refused when either is zero (a zero standard error says nothing about the noise).

Each comparison also says what it could resolve: `mde` is the smallest |Δ| detectable with 80%
power at `alpha` with the examples it has, and `n_needed` how many examples would make the
observed Δ detectable (both by the normal approximation on Δ's standard error; for 0/1 scores
the exact test also needs enough discordant examples).

`replicated` compares two cells run at R seeds each (replicate i of both cells drew the same
seeds, and every replicate scored the same examples), so that a verdict holds for a new seed and
for new examples, not only for the one pruned model a single run is:

- Δ is the mean over replicates of each replicate pair's Δ.
- its interval is a two-stage bootstrap: replicate pairs resampled, then examples (the same
  examples for every replicate and both cells), Δ recomputed.
- its p-value is the larger of two: an exact sign-flip permutation over the R seed-paired Δs
  (the replicate is the unit of replication: it cannot go below 2/2^R, the floor, so 5 seeds
  never reach 0.05) and the paired test over examples of the replicate-averaged scores (a
  difference must survive new examples too). Rejecting only when both do is an
  intersection-union test: its level is alpha.
- the noise splits into the between-seed variance of the replicate Δs (over R) and the example
  variance of Δ (over n): `mde` comes from their sum, and `seeds_needed` / `n_needed` say how
  many seeds (examples kept) or examples (seeds kept) would detect the observed Δ, where either
  can.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from sparselab.evaluate.examples import Aggregate, aggregate

AFFECTS_RESULTS = False  # plans or reports only: sparselab.provenance leaves it out

POWER = 0.8
RESAMPLES = 10_000
Correction = Literal["holm", "bh", "none"]


@dataclass(frozen=True)
class Comparison:
    """Δ = cell − baseline with its (1 − alpha) confidence interval and two-sided p-value."""
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    se: float  # standard error of Δ
    test: str  # mcnemar | permutation | unpaired-z
    n: int | None  # examples both cells scored (None: unpaired)
    mde: float | None  # smallest |Δ| detectable at 80% power (None: no spread to judge by)
    n_needed: int | None  # examples that would detect the observed Δ at 80% power
    seeds: Seeds | None = None  # across replicates: the seed-level part of the comparison

    @property
    def paired(self) -> bool:
        return self.n is not None


@dataclass(frozen=True)
class Seeds:
    """The replicate side of a comparison across seeds."""
    replicates: int  # seed-paired replicate pairs
    p_seeds: float  # exact sign-flip permutation over the replicate Δs
    p_examples: float  # paired test over examples of the replicate-averaged scores
    p_floor: float  # the smallest p the permutation can give with this many replicates
    sd: float | None  # between-seed SD of the replicate Δs (None: one replicate)
    se_examples: float  # the example-sampling SE of Δ
    seeds_needed: int | None  # replicates that would detect the observed Δ (examples kept)

    @property
    def dominant(self) -> str:
        """Which noise is larger in Δ's variance: 'seeds' or 'examples'."""
        seed_var = (self.sd or 0.0) ** 2 / self.replicates
        return "seeds" if seed_var > self.se_examples ** 2 else "examples"


def _z(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(POWER)


def mcnemar_exact(worse: int, better: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts (binomial, p = 1/2)."""
    n = worse + better
    if n == 0:
        return 1.0
    k = min(worse, better)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar_min_discordant(alpha: float) -> int:
    """The fewest discordant examples (all one way) with which the exact test can reach alpha."""
    return math.ceil(math.log2(2 / alpha))


def _agresti_min(worse: int, better: int, n: int, alpha: float) -> tuple[float, float, float]:
    """Interval and standard error of a paired difference of proportions, (better − worse)/n:
    the Wald interval after adding 1/2 to each of the four agreement counts (Agresti & Min
    2005), which stays honest when no example is discordant (the plain interval is [0, 0])."""
    b, c, m = worse + 0.5, better + 0.5, n + 2
    centre = (c - b) / m
    se = math.sqrt(max(b + c - (c - b) ** 2 / m, 0.0)) / m
    half = NormalDist().inv_cdf(1 - alpha / 2) * se
    return centre - half, centre + half, se


def _binary_scale(a: np.ndarray, b: np.ndarray, full_score: float | None) -> float | None:
    """s when every score is 0 or s (s > 0: `full_score` where known), else None."""
    values = np.unique(np.concatenate([a, b]))
    nonzero = values[values != 0]
    if len(nonzero) == 0:  # nothing hit: a 0/1 score only if its full score is known
        return full_score
    if len(nonzero) == 1 and nonzero[0] > 0 and nonzero[0] == (full_score or nonzero[0]):
        return float(nonzero[0])
    return None


def _permutation_p(a: np.ndarray, b: np.ndarray, how: Aggregate, observed: float,
                   rng: np.random.Generator, resamples: int) -> float:
    n = len(a)
    exact = n <= math.floor(math.log2(resamples))
    if exact:  # every assignment of swaps
        swaps = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)
    else:
        swaps = rng.random((resamples, n)) < 0.5
    stats = aggregate(np.where(swaps, a, b), how) - aggregate(np.where(swaps, b, a), how)
    tolerance = 1e-12 * max(1.0, abs(observed))
    extreme = int(np.sum(np.abs(stats) >= abs(observed) - tolerance))
    return extreme / len(swaps) if exact else (extreme + 1) / (resamples + 1)


def _bootstrap(a: np.ndarray, b: np.ndarray, how: Aggregate, rng: np.random.Generator,
               resamples: int, chunk: int = 1000) -> np.ndarray:
    n = len(a)
    out = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        out.append(aggregate(b[idx], how) - aggregate(a[idx], how))
    return np.concatenate(out)


def paired(base: dict[str, float], cell: dict[str, float], how: Aggregate = "mean", *,
           full_score: float | None = None, alpha: float = 0.05, seed: int = 0,
           resamples: int = RESAMPLES) -> Comparison | None:
    """Compare two cells' per-example scores on the examples both have (None: none shared).
    `full_score`: the score of a hit when the metric is bounded (1, or 100 for percentages)."""
    ids = sorted(base.keys() & cell.keys())
    if not ids:
        return None
    a = np.array([base[i] for i in ids], dtype=np.float64)
    b = np.array([cell[i] for i in ids], dtype=np.float64)
    n = len(ids)
    rng = np.random.default_rng(seed)
    delta = float(aggregate(b, how) - aggregate(a, how))
    fewest = mcnemar_min_discordant(alpha)  # also the fewest pairs a permutation test needs
    scale = _binary_scale(a, b, full_score) if how == "mean" else None
    if scale is not None:
        worse, better = int(np.sum(a > b)), int(np.sum(b > a))
        p_value, test = mcnemar_exact(worse, better), "mcnemar"
        low, high, se = _agresti_min(worse, better, n, alpha)
        low, high, se = scale * low, scale * high, scale * se
        floor = scale * fewest / n if fewest <= n else math.inf
    else:
        p_value, test = _permutation_p(a, b, how, delta, rng, resamples), "permutation"
        boot = _bootstrap(a, b, how, rng, resamples)
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        se = float(boot.std(ddof=1)) if n > 1 else 0.0
        if se < 1e-9 * max(1.0, abs(delta), float(np.abs(a).max())):
            se = 0.0  # a constant difference: the bootstrap's spread is rounding
        floor = math.inf if n < fewest else 0.0
    mde = max(_z(alpha) * se, floor) if se > 0 or floor > 0 else None
    n_needed = None
    if delta != 0 and (se > 0 or n < fewest):
        n_needed = max(fewest, math.ceil(n * (_z(alpha) * se / abs(delta)) ** 2))
    return Comparison(delta, float(min(low, delta)), float(max(high, delta)), p_value, se,
                      test, n, mde, n_needed)


def sign_flip_p(differences: np.ndarray, rng: np.random.Generator,
                resamples: int = RESAMPLES) -> float:
    """Two-sided permutation p of the mean of paired differences: each sign flipped with
    probability 1/2 (all 2^R flips when that is at most `resamples`)."""
    r = len(differences)
    observed = abs(differences.mean())
    if r <= math.floor(math.log2(resamples)):
        signs = 1 - 2 * ((np.arange(2 ** r)[:, None] >> np.arange(r)) & 1)
        exact = True
    else:
        signs, exact = np.where(rng.random((resamples, r)) < 0.5, -1, 1), False
    stats = np.abs((signs * differences).mean(axis=1))
    extreme = int(np.sum(stats >= observed - 1e-12 * max(1.0, observed)))
    return extreme / len(signs) if exact else (extreme + 1) / (resamples + 1)


def seed_floor(replicates: int) -> float:
    """The smallest two-sided p a sign-flip permutation over `replicates` pairs can give."""
    return min(1.0, 2.0 / 2 ** replicates)


def replicated(base: list[dict[str, float]], cell: list[dict[str, float]],
               how: Aggregate = "mean", *, alpha: float = 0.05, seed: int = 0,
               resamples: int = RESAMPLES) -> Comparison | None:
    """Compare two cells across seed-paired replicates (`base[i]` and `cell[i]` drew the same
    seeds), each a dict of per-example scores, on the examples every replicate scored."""
    if not base or len(base) != len(cell):
        raise ValueError("replicated: give the two cells' replicates in seed-paired order")
    ids = sorted(set.intersection(*(set(scores) for scores in (*base, *cell))))
    if not ids:
        return None
    a = np.array([[scores[i] for i in ids] for scores in base], dtype=np.float64)
    b = np.array([[scores[i] for i in ids] for scores in cell], dtype=np.float64)
    r, n = a.shape
    rng = np.random.default_rng(seed)
    differences = aggregate(b, how) - aggregate(a, how)  # one Δ per replicate pair
    delta = float(differences.mean())
    pooled = paired(dict(zip(ids, a.mean(axis=0))), dict(zip(ids, b.mean(axis=0))), how,
                    alpha=alpha, seed=seed, resamples=resamples)
    p_seeds = sign_flip_p(differences, rng, resamples) if r > 1 else 1.0
    boot = []
    for start in range(0, resamples, chunk := max(1, 2_000_000 // (r * n))):
        size = min(chunk, resamples - start)
        reps = rng.integers(0, r, size=(size, r))[:, :, None]
        examples = rng.integers(0, n, size=(size, n))[:, None, :]
        boot.append((aggregate(b[reps, examples], how)
                     - aggregate(a[reps, examples], how)).mean(axis=1))
    boot = np.concatenate(boot)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    se = float(boot.std(ddof=1))
    sd = float(differences.std(ddof=1)) if r > 1 else None
    seed_var, example_var = (sd or 0.0) ** 2 / r, pooled.se ** 2
    z2 = _z(alpha) ** 2
    fewest = mcnemar_min_discordant(alpha)  # replicates a sign flip needs to reach alpha
    floor = seed_floor(r)
    total = seed_var + example_var
    mde = math.inf if floor >= alpha else (math.sqrt(z2 * total) if total > 0 else None)
    seeds_needed = n_needed = None
    if delta != 0 and sd is not None:
        room = delta ** 2 / z2 - example_var  # what the seeds' variance may use
        if room > 0:
            seeds_needed = max(fewest, math.ceil((sd ** 2) / room)) if sd > 0 else fewest
        room = delta ** 2 / z2 - seed_var  # what the examples' variance may use
        if room > 0 and r >= fewest:
            n_needed = max(pooled.n_needed or 0, math.ceil(n * example_var / room))                 if example_var > 0 else n
    return Comparison(delta, float(min(low, delta)), float(max(high, delta)),
                      max(p_seeds, pooled.p_value, floor), se, "replicates", n, mde, n_needed,
                      Seeds(r, p_seeds, pooled.p_value, floor, sd, pooled.se, seeds_needed))


def unpaired(value: float, se: float | None, ref: float, se_ref: float | None, *,
             alpha: float = 0.05) -> Comparison | None:
    """A z-test on independent standard errors; None when either is missing or zero."""
    if se is None or se_ref is None or se <= 0 or se_ref <= 0:
        return None
    delta = value - ref
    noise = math.sqrt(se ** 2 + se_ref ** 2)
    half = NormalDist().inv_cdf(1 - alpha / 2) * noise
    p_value = 2 * (1 - NormalDist().cdf(abs(delta) / noise))
    return Comparison(delta, delta - half, delta + half, p_value, noise, "unpaired-z", None,
                      _z(alpha) * noise, None)


def adjust(p_values: list[float], method: Correction = "holm") -> list[float]:
    """Family-wise (Holm) or false-discovery-rate (Benjamini–Hochberg) adjusted p-values."""
    m = len(p_values)
    if method == "none" or m == 0:
        return list(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    if method == "holm":
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * p_values[i]))
            adjusted[i] = running
    elif method == "bh":
        running = 1.0
        for rank in range(m - 1, -1, -1):
            i = order[rank]
            running = min(running, m * p_values[i] / (rank + 1))
            adjusted[i] = min(1.0, running)
    else:
        raise ValueError(f"unknown correction '{method}' (holm, bh, none)")
    return adjusted
