"""Matrix expansion, hashing and the shared prune stages of the task_specific table."""
from __future__ import annotations

import pytest

from sparselab.matrix import dense_reference, expand, load_matrix, parse_set
from sparselab.stages import plan_cell
from sparselab.validate import source_of

from conftest import write

GUIDE = """
name: guide
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: magnitude, sparsity: 0.5, calibration: {data: wikitext2, samples: 4, seqlen: 32}}
  recover: {method: none, data: wikitext2}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64}, tasks: []}
experiments:
  baseline: {prune.calibration.data: wikitext2, recover.data: wikitext2}
  exp1:     {prune.calibration.data: wikitext2, recover.data: squad}
  exp2:     {prune.calibration.data: squad,     recover.data: squad}
  exp3:     {prune.calibration.data: wikitext2, recover.data: gsm8k}
  exp4:     {prune.calibration.data: gsm8k,     recover.data: gsm8k}
"""


def test_expansion_names_grid_and_overrides(tmp_path):
    path = write(tmp_path / "m.yaml", GUIDE + "grid:\n  prune.sparsity: [0.5, 0.6]\n")
    cells = expand(load_matrix(path), parse_set(["evaluate.limit=5"]))
    assert [c.name for c in cells][:3] == ["baseline[prune.sparsity=0.5]",
                                           "baseline[prune.sparsity=0.6]",
                                           "exp1[prune.sparsity=0.5]"]
    assert len(cells) == 10
    assert {c.config.prune.sparsity for c in cells} == {0.5, 0.6}
    assert all(c.config.evaluate.limit == 5 for c in cells)
    assert cells[4].config.prune.calibration.data == "squad"
    # stage seeds are filled from the cell seed, so the hash sees them
    assert cells[0].config.prune.calibration.seed == 0


def test_hash_is_stable_and_sensitive(tmp_path):
    path = write(tmp_path / "m.yaml", GUIDE)
    first = {c.name: c.hash for c in expand(load_matrix(path))}
    again = {c.name: c.hash for c in expand(load_matrix(path))}
    assert first == again
    assert len(set(first.values())) == 5
    changed = {c.name: c.hash for c in expand(load_matrix(path), parse_set(["prune.sparsity=0.51"]))}
    assert all(changed[name] != first[name] for name in first)
    seeded = {c.name: c.hash for c in expand(load_matrix(path), parse_set(["seed=1"]))}
    assert all(seeded[name] != first[name] for name in first)


def test_mixture_weights_are_normalised(tmp_path):
    text = GUIDE.split("experiments:")[0]
    path = write(tmp_path / "m.yaml", text)
    cells = expand(load_matrix(path),
                   parse_set(["prune.calibration.data={mix: {wikitext2: 1, squad: 3}}"]))
    assert [c.name for c in cells] == ["default"]
    assert cells[0].config.prune.calibration.data.mix == {"squad": 0.75, "wikitext2": 0.25}


def _prune_keys(path, sets=()):
    cells = expand(load_matrix(path), parse_set(list(sets)))
    plans = [plan_cell(c, source_of(c)) for c in cells]
    return {c.name: p.model.lineage()[1].key for c, p in zip(cells, plans)}


def test_guide_table_has_three_distinct_prune_stages(tmp_path, monkeypatch):
    """Baseline, exp1 and exp3 share the wikitext2 calibration, so they prune once."""
    from sparselab.prune.magnitude.method import MagnitudePruning
    monkeypatch.setattr(MagnitudePruning, "needs_calibration", True)
    keys = _prune_keys(write(tmp_path / "m.yaml", GUIDE))
    assert len(set(keys.values())) == 3
    assert keys["baseline"] == keys["exp1"] == keys["exp3"]
    assert len({keys["baseline"], keys["exp2"], keys["exp4"]}) == 3


def test_calibration_free_method_shares_one_prune(tmp_path):
    assert len(set(_prune_keys(write(tmp_path / "m.yaml", GUIDE)).values())) == 1


def test_dense_reference_is_shared_and_unpruned(tmp_path):
    cells = expand(load_matrix(write(tmp_path / "m.yaml", GUIDE)))
    refs = {dense_reference(c).hash for c in cells}
    assert len(refs) == 1
    ref = dense_reference(cells[0])
    assert ref.config.prune.method == "none" and ref.config.recover.method == "none"
    plan = plan_cell(ref, source_of(ref))
    assert [role for role, _ in plan.roles()] == ["load", "perplexity"]


def test_nm_pattern_sets_the_sparsity_it_implies():
    from sparselab.errors import UserError
    from sparselab.matrix import Prune
    from sparselab.registry import PRUNING
    assert Prune(pattern="1:4").sparsity == 0.75  # N:M keeps N of M, whatever the default
    PRUNING.get("wanda")().check(Prune(pattern="2:4", sparsity=0.5))
    with pytest.raises(UserError, match="keeps 2 of every 4 weights") as refused:
        PRUNING.get("wanda")().check(Prune(pattern="2:4", sparsity=0.7))
    assert refused.value.key == "prune.sparsity"


def test_tiers_pattern_sets_the_sparsity_its_ratios_imply():
    from sparselab.errors import UserError
    from sparselab.matrix import Prune
    from sparselab.registry import PRUNING
    half = {"tiers": {"ratios": [0.25, 0.5, 0.25], "nm": "2:4", "block": 16}}
    assert Prune(pattern="tiers").sparsity == pytest.approx(0.425)  # the default ratios
    assert Prune(pattern="tiers", options=half).sparsity == 0.5
    for method in ("wanda", "sparsegpt"):
        PRUNING.get(method)().check(Prune(method=method, pattern="tiers", options=half,
                                          sparsity=0.5))
        # a 50% default beside the default tiers (42.5%) is a contradiction, not a silent 42.5%
        with pytest.raises(UserError, match=r"prunes 0.425 .* prune.sparsity is 0.5") as refused:
            PRUNING.get(method)().check(Prune(method=method, pattern="tiers", sparsity=0.5))
        assert refused.value.key == "prune.sparsity"
