"""The paired tests, intervals and corrections, against direct computations and hand values."""
from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from sparselab import stats


def _ids(values) -> dict[str, float]:
    return {str(i): float(v) for i, v in enumerate(values)}


def _mcnemar_by_enumeration(worse: int, better: int) -> float:
    """P(a split of the discordant examples at least as lopsided), all 2^m coin flips counted."""
    m = worse + better
    observed = abs(better - worse)
    extreme = sum(abs(2 * sum(flips) - m) >= observed for flips in itertools.product((0, 1), repeat=m))
    return extreme / 2 ** m


@pytest.mark.parametrize("worse,better", [(0, 0), (0, 6), (1, 9), (3, 4), (2, 12), (7, 7)])
def test_mcnemar_exact_against_enumeration(worse, better):
    assert stats.mcnemar_exact(worse, better) == pytest.approx(_mcnemar_by_enumeration(worse, better))


def test_paired_beats_unpaired_on_the_same_questions():
    """Accuracy 0.60 -> 0.66 on 100 questions where the cell gains 6 and loses none: the exact
    McNemar test sees it (p = 2/64); two independent standard errors do not (z ≈ 0.9)."""
    base = np.array([1] * 60 + [0] * 40)
    cell = base.copy()
    cell[60:66] = 1
    c = stats.paired(_ids(base), _ids(cell), full_score=1.0)
    assert c.test == "mcnemar" and c.n == 100
    assert c.delta == pytest.approx(0.06)
    assert c.p_value == pytest.approx(2 / 2 ** 6)
    se = lambda p: math.sqrt(p * (1 - p) / 100)  # noqa: E731 - lm-eval's acc_stderr (n-1 aside)
    u = stats.unpaired(0.66, se(0.66), 0.60, se(0.60))
    assert c.p_value < 0.05 < u.p_value
    assert c.ci_low > 0 > u.ci_low


def test_unpaired_significance_implies_paired_on_positively_correlated_scores():
    """The reverse case (unpaired significant, paired not) cannot happen when the cells' scores
    move together: checked over many random studies with real effects and none."""
    rng = np.random.default_rng(7)
    unpaired_hits = 0
    for trial in range(60):
        n = 80
        base = rng.normal(2.0, 1.0, n)
        cell = base + rng.normal(0.0, 0.3, n) + rng.choice([0.0, 0.2, 0.5])
        c = stats.paired(_ids(base), _ids(cell), seed=trial, resamples=2000)
        se = lambda x: float(np.std(x, ddof=1) / math.sqrt(n))  # noqa: E731
        u = stats.unpaired(float(cell.mean()), se(cell), float(base.mean()), se(base))
        if u.p_value < 0.05:
            unpaired_hits += 1
            assert c.p_value < 0.05
        assert c.se < u.se
    assert unpaired_hits > 5  # the property was exercised


def test_bootstrap_interval_and_se_match_direct_computations():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 400)
    cell = base + rng.normal(0.05, 0.2, 400)
    c = stats.paired(_ids(base), _ids(cell), "mean", seed=1)
    d = cell - base
    assert c.delta == pytest.approx(d.mean())
    assert c.test == "permutation"
    direct_se = d.std(ddof=1) / math.sqrt(len(d))
    assert c.se == pytest.approx(direct_se, rel=0.05)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert c.ci_low == pytest.approx(d.mean() - z * direct_se, abs=0.3 * direct_se)
    assert c.ci_high == pytest.approx(d.mean() + z * direct_se, abs=0.3 * direct_se)
    # perplexity: Δ of exp(mean window loss), its se by the delta method
    p = stats.paired(_ids(base), _ids(cell), "exp_mean", seed=1)
    assert p.delta == pytest.approx(math.exp(cell.mean()) - math.exp(base.mean()))
    assert p.se == pytest.approx(math.exp(base.mean()) * direct_se, rel=0.1)
    # seeded: the same numbers twice
    assert stats.paired(_ids(base), _ids(cell), "exp_mean", seed=1) == p


def test_permutation_is_exact_on_few_examples():
    three = stats.paired(_ids([1, 2, 3]), _ids([1.5, 2.5, 3.5]))
    assert three.p_value == pytest.approx(2 / 8)  # identity and all-swapped are as extreme
    assert math.isinf(three.mde) and three.n_needed == 6  # no test reaches 0.05 with 3 pairs
    eight = stats.paired(_ids(range(8)), _ids(np.arange(8) + np.linspace(0.1, 0.8, 8)))
    assert eight.p_value == pytest.approx(2 / 2 ** 8)


def test_only_shared_examples_are_joined():
    c = stats.paired({"a": 1.0, "b": 0.0, "c": 1.0}, {"b": 1.0, "c": 1.0, "d": 0.0},
                     full_score=1.0)
    assert c.n == 2 and c.delta == pytest.approx(0.5)
    assert stats.paired({"a": 1.0}, {"b": 1.0}) is None


def test_no_discordant_examples_is_not_certainty():
    """Four questions all wrong in both cells: Δ = 0, but the interval is not [0, 0] (Agresti-Min)
    and a 0/100 score keeps its scale."""
    c = stats.paired(_ids([0] * 4), _ids([0] * 4), full_score=100.0)
    assert c.test == "mcnemar" and c.p_value == 1.0
    assert c.ci_low < -20 and c.ci_high > 20
    many = stats.paired(_ids([1] * 100 + [0] * 100), _ids([1] * 100 + [0] * 100), full_score=1.0)
    assert -0.02 < many.ci_low < 0 < many.ci_high < 0.02


def test_zero_standard_error_never_makes_a_change_significant():
    assert stats.unpaired(0.51, 0.0, 0.50, 0.0) is None
    assert stats.unpaired(0.51, 0.01, 0.50, 0.0) is None
    assert stats.unpaired(0.51, None, 0.50, 0.01) is None


def test_resolution_grows_with_examples():
    rng = np.random.default_rng(3)
    base = rng.normal(2.0, 1.0, 100)
    cell = base + rng.normal(0.02, 0.5, 100)
    c = stats.paired(_ids(base), _ids(cell), seed=0)
    z = statistics.NormalDist().inv_cdf(0.975) + statistics.NormalDist().inv_cdf(0.8)
    assert c.mde == pytest.approx(z * c.se)
    assert c.n_needed == math.ceil(100 * (z * c.se / abs(c.delta)) ** 2)


def test_holm_and_benjamini_hochberg_against_hand_values():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06, 0.04)=0.06
    assert stats.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04, then running minima
    assert stats.adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.adjust(p, "none") == p
    assert stats.adjust([0.6, 0.9], "holm") == pytest.approx([1.0, 1.0])
    assert stats.adjust([], "holm") == []
