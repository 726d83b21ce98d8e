"""Replicates: a cell run at several seeds, paired across cells by seed and by example, and the
report's verdicts across them (seed noise and example noise, the floor R seeds put on p)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write
from mlflow.tracking import MlflowClient

from sparselab.cli import main
from sparselab.evaluate.examples import ExampleScores
from sparselab.matrix import expand, load_matrix
from sparselab.stats import paired, replicated, seed_floor

MATRIX = """name: seeds
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: wanda, sparsity: 0.5, calibration: {samples: 4, seqlen: 32}}
  recover: {method: lora, train: {samples: 8, seqlen: 32, batch_size: 4, max_steps: 1}}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64, max_windows: 4}, tasks: []}
  replicates: {seeds: [prune.calibration.seed, recover.train.seed], n: 3}
experiments:
  both: {}
  training_only: {prune.sparsity: 0.4, replicates.seeds: [recover.train.seed]}
  listed: {prune.sparsity: 0.3, replicates: {seeds: {prune.calibration.seed: [7, 11]}}}
  once: {prune.sparsity: 0.2, replicates: null}
"""


def test_replicates_draw_the_same_seeds_in_every_cell(workspace):
    cells = expand(load_matrix(write(workspace / "m.yaml", MATRIX)))
    seeds = {c.id: (c.config.prune.calibration.seed, c.config.recover.train.seed) for c in cells}
    assert seeds == {"both#0": (0, 0), "both#1": (1, 1), "both#2": (2, 2),
                     "training_only#0": (0, 0), "training_only#1": (0, 1),
                     "training_only#2": (0, 2), "listed#0": (7, 0), "listed#1": (11, 0),
                     "once": (0, 0)}
    assert {c.name for c in cells if c.replicate is not None} == {"both", "training_only",
                                                                    "listed"}
    # replicate 0 has the unreplicated cell's config, yet is its own run
    zero = next(c for c in cells if c.id == "both#0")
    plain = expand(load_matrix(write(workspace / "m.yaml", MATRIX.split("  replicates:")[0]
                                     + "experiments:\n  both: {}\n")))
    plain_both = next(c for c in plain if c.name == "both")
    assert zero.config == plain_both.config and zero.hash != plain_both.hash


def test_replicates_share_the_stages_their_seeds_agree_on(workspace):
    from sparselab.study import prepare_plans
    _, plans = prepare_plans(str(write(workspace / "m.yaml", MATRIX)), None, (), None)
    by_id = {p.cell.id: p for p in plans}
    prunes = {i: by_id[f"training_only#{i}"].stage("prune").key for i in range(3)}
    recovers = {i: by_id[f"training_only#{i}"].stage("recover").key for i in range(3)}
    assert len(set(prunes.values())) == 1  # R LoRA seeds on one pruned model
    assert len(set(recovers.values())) == 3
    assert len({by_id[f"both#{i}"].stage("prune").key for i in range(3)}) == 3
    plan = CliRunner().invoke(main, ["plan", str(workspace / "m.yaml")])
    assert plan.exit_code == 0, plan.output
    assert "training_only#2" in plan.output
    said = " ".join(plan.output.split())
    assert "training_only: 3 replicates" in said and "1 distinct prune" in said


@pytest.mark.parametrize("replicates,key,says", [
    ("{seeds: [evaluate.seed], n: 2}", "replicates.seeds", "'prune.calibration.seed' or"),
    ("{seeds: [recover.train.seed]}", "replicates", "give n"),
    ("{seeds: {recover.train.seed: [1], prune.calibration.seed: [1, 2]}}", "replicates",
     "the same number of values"),
    ("{n: 0}", "replicates.n", "greater than 0"),
    ("{nn: 2}", "replicates.nn", "Did you mean 'n'"),
])
def test_bad_replicates_are_refused_naming_file_line_and_key(workspace, replicates, key, says):
    path = write(workspace / "bad.yaml", "name: bad\nmodel: tiny-llama\ndefaults:\n"
                 f"  replicates: {replicates}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "bad.yaml" in said and "line 4" in said and key in said and says in said
    assert "Traceback" not in result.output


# --- the statistics against direct computations ------------------------------------------------

def _replicates(rng, n, r, seed_sd, effect, spread=0.0, noise=0.05):
    """Per-example scores of a baseline and a cell at r seeds on common examples: each seed
    shifts the cell's scores by a draw of sd `seed_sd` (the pruned model a seed made); the
    effect differs between examples by sd `spread`, the same at every seed."""
    examples = rng.normal(0, 1.0, n)
    effects = effect + rng.normal(0, spread, n)
    base, cell = [], []
    for _ in range(r):
        shift = rng.normal(0, seed_sd)
        base.append({str(i): examples[i] + rng.normal(0, noise) for i in range(n)})
        cell.append({str(i): examples[i] + effects[i] + shift + rng.normal(0, noise)
                     for i in range(n)})
    return base, cell


def test_seed_noise_that_one_draw_calls_significant_is_not_a_verdict():
    base, cell = _replicates(np.random.default_rng(3), n=300, r=6, seed_sd=0.5, effect=0.0)
    single = paired(base[0], cell[0])
    assert single.p_value < 0.001  # one draw of the model: "different"
    c = replicated(base, cell)
    assert c.p_value > 0.05 and c.ci_low < 0 < c.ci_high
    assert c.seeds.dominant == "seeds"
    # Δ and the seed-level p, computed directly
    ids = [str(i) for i in range(300)]
    d = np.array([np.mean([cl[i] for i in ids]) - np.mean([b[i] for i in ids])
                  for b, cl in zip(base, cell)])
    assert c.delta == pytest.approx(d.mean())
    flips = [abs(np.mean(np.array(s) * d)) for s in itertools.product([1, -1], repeat=6)]
    direct = np.mean([f >= abs(d.mean()) - 1e-12 for f in flips])
    assert c.seeds.p_seeds == pytest.approx(direct)
    assert c.seeds.sd == pytest.approx(d.std(ddof=1))


def test_an_effect_larger_than_both_noises_holds_across_seeds():
    base, cell = _replicates(np.random.default_rng(4), n=300, r=6, seed_sd=0.02, effect=0.5)
    c = replicated(base, cell)
    assert c.p_value == pytest.approx(seed_floor(6)) and c.p_value < 0.05  # 2/64: all agree
    assert 0.4 < c.ci_low < 0.5 < c.ci_high < 0.6
    assert c.mde < 0.5


def test_the_number_of_seeds_puts_a_floor_under_p():
    base, cell = _replicates(np.random.default_rng(5), n=200, r=3, seed_sd=0.01, effect=2.0)
    c = replicated(base, cell)
    assert seed_floor(3) == 0.25 and c.p_value == 0.25  # 3 vs 3 can never reach 0.05
    assert c.seeds.p_examples < 0.001  # however clear the examples are
    assert c.mde == float("inf") and c.n_needed is None
    assert c.seeds.seeds_needed == 6  # what a verdict at 0.05 needs
    single = replicated(base[:1], cell[:1])
    assert single.p_value == 1.0 and single.seeds.sd is None


def test_what_a_comparison_needs_more_of():
    # seeds dominate: more seeds would tell, more examples would not
    base, cell = _replicates(np.random.default_rng(6), n=400, r=6, seed_sd=0.3, effect=0.15)
    c = replicated(base, cell)
    if c.p_value >= 0.05:
        assert c.seeds.seeds_needed is not None and c.seeds.seeds_needed > 6
    # examples dominate: tiny seed noise, an effect that varies from example to example
    base, cell = _replicates(np.random.default_rng(7), n=30, r=6, seed_sd=0.001, effect=0.1,
                             spread=0.5, noise=0.001)
    c = replicated(base, cell)
    assert c.seeds.dominant == "examples" and c.p_value > 0.05
    assert c.n_needed is not None and c.n_needed > 30
    assert c.seeds.seeds_needed is None  # more seeds cannot shrink the examples' noise


# --- the report on a replicated store ----------------------------------------------------------

REPORTED = """name: reported
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: wanda}
  recover: {method: none}
  replicates: {seeds: [prune.calibration.seed], n: 6}
experiments:
  baseline: {prune.sparsity: 0.5}
  drifting: {prune.sparsity: 0.45}
  better: {prune.sparsity: 0.4}
  few: {prune.sparsity: 0.42, replicates.n: 3}
expect:
  drifting: {wikitext2.ppl: better}
  better: {wikitext2.ppl: better}
  few: {wikitext2.ppl: better}
report: {baseline: baseline, metrics: [wikitext2.ppl]}
"""


def _log(client, exp, parent, cell, replicate, nll, tmp):
    tags = {"mlflow.parentRunId": parent, "sparselab.cell": cell,
            "sparselab.data_source": "builtin", "sparselab.stage.perplexity.key": "k"}
    if replicate is not None:
        tags["sparselab.replicate"] = str(replicate)
    run = client.create_run(exp, run_name=cell, tags=tags).info.run_id
    client.log_param(run, "evaluate.perplexity.seqlen", "64")
    client.log_param(run, "prune.calibration.seed", str(replicate or 0))
    client.log_metric(run, "wikitext2.ppl", float(np.exp(nll.mean())))
    client.log_metric(run, "wikitext2.ppl_stderr",
                      float(np.exp(nll.mean()) * nll.std(ddof=1) / np.sqrt(len(nll))))
    scores = ExampleScores()
    scores.add("wikitext2.ppl", [f"wikitext2/window/{i}" for i in range(len(nll))], nll,
               "exp_mean")
    client.log_artifact(run, str(scores.write(tmp / run / "perplexity")), "stages/perplexity")
    client.set_terminated(run, "FINISHED")


@pytest.fixture
def replicated_store(workspace):
    """`drifting` differs from the baseline by seed noise only (each seed a shift of sd 0.05
    nats, no effect); `better` is 0.1 nats better at every seed; `few` is as much better as
    `better`, at 3 seeds."""
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    exp = client.create_experiment("reported")
    parent = client.create_run(exp).info.run_id
    rng = np.random.default_rng(0)
    windows = rng.normal(3.0, 0.3, 60)
    _log(client, exp, parent, "dense", None, windows - 0.5, workspace)
    for i in range(6):
        _log(client, exp, parent, "baseline", i, windows + rng.normal(0, 0.01, 60), workspace)
        _log(client, exp, parent, "drifting", i,
             windows + rng.normal(0, 0.05) + rng.normal(0, 0.01, 60), workspace)
        _log(client, exp, parent, "better", i,
             windows - 0.1 + rng.normal(0, 0.005) + rng.normal(0, 0.01, 60), workspace)
        if i < 3:
            _log(client, exp, parent, "few", i,
                 windows - 0.1 + rng.normal(0, 0.005) + rng.normal(0, 0.01, 60), workspace)
    return write(workspace / "reported.yaml", REPORTED)


def test_the_report_judges_each_configuration_across_its_seeds(replicated_store):
    result = CliRunner().invoke(main, ["report", str(replicated_store), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {r["cell"]: r for r in data["rows"]}
    assert rows["baseline"]["replicates"] == 6 and rows["dense"]["replicates"] == 1
    assert rows["drifting"]["seed_sd"] > 0 and rows["drifting"]["test"] == "replicates"
    assert rows["few"]["p_floor"] == 0.25 and rows["few"]["p_value"] >= 0.25
    assert rows["better"]["p_value"] == pytest.approx(2 / 64)
    verdicts = {v["cell"]: v for v in data["expectations"]}
    assert len(verdicts) == 3  # one hypothesis per configuration, not per seed
    assert verdicts["few"]["verdict"] == "inconclusive"  # clear, but 3 seeds cannot tell
    assert verdicts["drifting"]["observed"] in ("unresolved", "same")  # seed noise: no change
    # every seed agrees (p = 2/64, the floor at 6 seeds), but Holm over three configurations
    # needs p < 0.05/3: 6 seeds cannot hold three hypotheses at once
    assert rows["better"]["p_adjusted"] == pytest.approx(3 * 2 / 64)
    assert verdicts["better"]["verdict"] == "inconclusive"
    assert "needs at least 6 seeds" in data["rule"] or "no p is below" in data["rule"]
    md = CliRunner().invoke(main, ["report", str(replicated_store), "--format", "md"])
    text = " ".join(md.output.split())
    assert "(6 seeds)" in text and "seed SD" in text and "3 seeds: p ≥ 0.25" in text
    # what would resolve `better`: not examples, but enough seeds for Holm over three (7)
    assert "6 seeds cannot pass the correction over 3; this Δ needs ~7 seeds" in text


def test_a_replicated_matrix_runs_and_reports(workspace):
    matrix = write(workspace / "run.yaml", """name: replicated_run
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: wanda, sparsity: 0.5, calibration: {samples: 2, seqlen: 32}}
  recover: {method: none}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64, max_windows: 4}, tasks: []}
  replicates: {seeds: [prune.calibration.seed], n: 2}
experiments:
  half: {}
  quarter: {prune.sparsity: 0.25}
report: {baseline: half, metrics: [wikitext2.ppl]}
""")
    run = CliRunner().invoke(main, ["run", str(matrix)])
    assert run.exit_code == 0, run.output
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("replicated_run")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    names = sorted(r.info.run_name for r in runs)
    assert names == ["dense", "half#0", "half#1", "quarter#0", "quarter#1"]
    assert {r.data.tags.get("sparselab.replicate") for r in runs} == {None, "0", "1"}
    latest = [r for r in runs if r.data.tags.get("sparselab.latest") == "true"]
    assert len(latest) == 5  # every replicate is a current result of its own
    more = CliRunner().invoke(main, ["plan", str(matrix), "--set", "replicates.n=3"])
    said = " ".join(more.output.split())  # the third draws cost what the first two took
    assert more.exit_code == 0 and "as stages of the same label took here" in said, more.output
    assert "without a timed twin" not in said
    again = CliRunner().invoke(main, ["run", str(matrix)])
    assert again.exit_code == 0 and again.output.count("skip") >= 5  # all finished
    report = CliRunner().invoke(main, ["report", str(matrix), "--format", "json", "--masks"])
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    rows = {r["cell"]: r for r in data["rows"]}
    assert rows["quarter"]["replicates"] == 2 and rows["quarter"]["test"] == "replicates"
    # two calibration draws remove mostly, not exactly, the same weights
    half = data["masks"]["half"]
    assert half["seeds"] == 2 and half["chance"] == pytest.approx(1 / 3, abs=0.01)
    assert half["chance"] < half["agreement"] < 1.0


def test_mask_agreement_equals_a_direct_computation(tmp_path, tiny_model_dir):
    import torch

    from sparselab.models import load_model, save_model
    from sparselab.prune.agreement import mask_agreement
    from sparselab.prune.layers import prunable_linears
    generator = torch.Generator().manual_seed(0)
    folders, masks = [], []
    for index in range(3):
        loaded = load_model(tiny_model_dir)
        pruned = {}
        with torch.no_grad():
            for name, linear in prunable_linears(loaded.model).items():
                mask = torch.rand(linear.weight.shape, generator=generator) < 0.5
                linear.weight[mask] = 0
                pruned[name] = linear.weight == 0
        save_model(loaded, tmp_path / f"m{index}")
        folders.append(tmp_path / f"m{index}")
        masks.append(pruned)
    found = mask_agreement(folders)
    inter = union = 0
    for a, b in itertools.combinations(masks, 2):
        for name in a:
            inter += int((a[name] & b[name]).sum())
            union += int((a[name] | b[name]).sum())
    assert found.models == 3 and found.overall == pytest.approx(inter / union)
    assert found.overall == pytest.approx(1 / 3, abs=0.02)  # independent draws at 50%
    assert set(found.per_layer) == {0, 1, 2, 3}
    assert mask_agreement(folders[:1] * 2).overall == 1.0
