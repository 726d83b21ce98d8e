"""`sparselab report`: the matrix's MLflow runs as one comparison table, read from the tracking store.

Rows are cells (the dense reference first), leading columns the config keys that differ between
cells, then each metric with ± stderr and its change Δ against the baseline cell. Every cell is
scored on the same examples, so a Δ is judged on the examples both cells scored
(`sparselab.stats.paired`: exact McNemar for 0/1 scores, a paired permutation test for graded
ones, a paired bootstrap interval), from the per-example scores each evaluation stage logs
(`stages/<role>/examples.json`). Runs without them fall back, labelled, to a z-test on the two
standard errors; metrics without any noise estimate (sparsity, parameter counts, times) are
compared as they are.

A Δ is up or down when its p-value is below `report.alpha`; `same` when its confidence interval
lies inside ± the metric's equivalence margin; otherwise unresolved, with the number of examples
that would resolve it. The `expect:` block is one family of hypotheses: its p-values are
corrected (`report.correction`) before they are judged. Cells evaluated differently (limit,
tasks, few-shot, data, lm-eval version) are not compared.

A cell run at several seeds (`replicates:` in the matrix) is one row: the replicates' mean, the
between-replicate SD and the within-run standard error side by side, and its Δ is judged across
seed-paired replicates (`sparselab.stats.replicated`: a two-stage bootstrap interval, a p-value
that no new seed or new example set could overturn at alpha, never below what the number of
replicates allows). A report whose cells ran once says that its verdicts hold for that one
pruned and recovered model per cell.
"""
from __future__ import annotations

import functools
import html
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselab.errors import UserError, unknown_name
from sparselab.evaluate.examples import EXAMPLES_FILE, ExampleScores, role_metric
from sparselab.matrix import ReportSpec, is_dense_reference
from sparselab.stats import (
    Comparison,
    adjust,
    mcnemar_min_discordant,
    paired,
    replicated,
    seed_floor,
    unpaired,
)
from sparselab.tracking import cell_id, run_metrics

AFFECTS_RESULTS = False  # plans or reports only: sparselab.provenance leaves it out

ARROWS = {"up": "↑", "down": "↓", "same": "≈", "unresolved": "?"}
PLOT_COLUMNS = 4
EVALUATION_ROLES = ("perplexity_pruned", "perplexity", "answer_loss", "tasks")

# Which way is better, by metric name: -1 lower, +1 higher (lm-eval's higher_is_better for our
# tasks' metrics; losses, perplexity, time and memory are lower-is-better).
LOWER_IS_BETTER = re.compile(r"(\.ppl(_pruned)?|_nll|^time\..*|_mb|\.prefill_ms_\d+)$")
HIGHER_IS_BETTER = re.compile(r"(\.(acc\w*|exact\w*|f1|\w+_f1|\w+_exact|best_\w+|mcc)"
                              r"|\.decode_tok_s_b\d+)$")
# Latency and throughput: their change also reads as a speed-up (x baseline time / cell's time).
SPEED = re.compile(r"^speed\.(\w+\.)?(prefill_ms_\d+|decode_tok_s_b\d+)$")


def speedup(metric: str, value: float, base: float) -> float | None:
    """How many times faster than the baseline a latency or throughput metric says the cell
    is (>1 faster); None for other metrics."""
    if not SPEED.match(metric) or not value or not base:
        return None
    return base / value if orientation(metric) < 0 else value / base


def orientation(metric: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when neither (sparsity, parameter counts)."""
    if LOWER_IS_BETTER.search(metric):
        return -1
    return 1 if HIGHER_IS_BETTER.search(metric) else 0


def default_margin(metric: str) -> str | float:
    """The equivalence margin of `same` where `report.margin` names none: 2 points of a
    percentage score (SQuAD's 0-100), 0.02 of a 0-1 accuracy, 0.05 nats of a loss, else 5% of
    the baseline's value (perplexity, times)."""
    if metric.startswith("squadv2."):
        return 2.0
    if orientation(metric) > 0:
        return 0.02
    if metric.endswith("_nll"):
        return 0.05
    return "5%"


def evaluation_keys(metric: str) -> tuple[str, ...]:
    """Config params (prefixes) and tags that must agree for two cells' `metric` to compare."""
    from sparselab.registry import TASKS
    if ".answer_" in metric:
        return ("evaluate.answer_loss.",)
    if ".ppl" in metric:
        return ("evaluate.perplexity.",)
    if metric.startswith("speed."):  # timings hold for one machine and one way of timing
        return ("evaluate.speed.", "tag:sparselab.speed.hardware")
    if metric.split(".")[0] in TASKS:
        return ("evaluate.tasks", "evaluate.limit", "evaluate.sample", "evaluate.num_fewshot",
                "evaluate.gen_kwargs", "evaluate.seed", "tag:sparselab.version.lm_eval")
    return ()


@dataclass
class Row:
    cell: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | NOT RUN
    run_id: str | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    examples: ExampleScores | None = None  # per-example scores; None: the run logged none
    replicate: int | None = None  # this run's replicate index (None: the cell is not replicated)
    replicates: list[Row] = field(default_factory=list)  # a replicated cell's row: its runs

    @classmethod
    def of_replicates(cls, runs: list[Row]) -> Row:
        """One row for a replicated cell: settings and tags of its first replicate, metrics the
        mean over its finished replicates (FINISHED when at least one finished)."""
        runs = sorted(runs, key=lambda r: r.replicate)
        done = [r for r in runs if r.status == "FINISHED"]
        first = (done or runs)[0]
        names = {m for r in done for m in r.metrics}
        metrics = {m: float(sum(v) / len(v)) for m in names
                   if (v := [r.metrics[m] for r in done if m in r.metrics])}
        return cls(first.cell, "FINISHED" if done else first.status, first.run_id, first.params,
                   metrics, first.tags, first.examples, None, runs)

    @property
    def finished_replicates(self) -> list[Row]:
        return [r for r in self.replicates if r.status == "FINISHED"]

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric) if self.status == "FINISHED" else None

    def stderr(self, metric: str) -> float | None:
        """The within-run standard error (a replicated cell: the root mean square of its
        replicates')."""
        if self.status != "FINISHED":
            return None
        if not self.replicates:
            return self.metrics.get(metric + "_stderr")
        errors = [r.metrics[metric + "_stderr"] for r in self.finished_replicates
                  if metric + "_stderr" in r.metrics]
        return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None

    def spread(self, metric: str) -> float | None:
        """The between-replicate SD of a replicated cell's metric (None: fewer than two)."""
        values = [v for r in self.finished_replicates if (v := r.value(metric)) is not None]
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    def scores(self, metric: str) -> dict[str, float] | None:
        return self.examples.scores.get(metric) if self.examples else None

    def setting(self, key: str) -> str:
        """The cell's value of a config key; a key logged only as sub-keys (a data mix logs
        `prune.calibration.data.mix`) reads as those, so every cell has a value in its column.
        A replicated cell's seed that its replicates vary reads as their values, in order."""
        if self.replicates:
            values = list(dict.fromkeys(r.setting(key) for r in self.replicates))
            if len(values) > 1:
                return ",".join(values)
        if key in self.params:
            return self.params[key]
        prefix = key + "."
        return ", ".join(f"{k[len(prefix):]}={v}" for k, v in sorted(self.params.items())
                         if k.startswith(prefix))

    def evaluation(self, metric: str) -> dict[str, str]:
        """The settings that decide how `metric` was measured (evaluation config, data, lm-eval)."""
        out = {"tag:sparselab.data_source": self.tags.get("sparselab.data_source", "")}
        for key in evaluation_keys(metric):
            if key.startswith("tag:"):
                out[key] = self.tags.get(key[4:], "")
            elif key.endswith("."):  # a section: every param in it
                out.update({k: v for k, v in self.params.items() if k.startswith(key)})
            else:
                out.update({k: v for k, v in self.params.items()
                            if k == key or k.startswith(key + ".")})
        return out


@dataclass
class Change:
    """One metric of one row against the baseline."""
    delta: float
    direction: str  # up | down | same | unresolved
    comparison: Comparison | None = None  # None: compared as it is (no noise estimate)
    margin: float | None = None
    p_adjusted: float | None = None
    speedup: float | None = None  # latency and throughput: times faster than the baseline

    @property
    def p_value(self) -> float | None:
        return self.comparison.p_value if self.comparison else None

    @property
    def test(self) -> str:
        """mcnemar | permutation | unpaired-z, or exact for a metric without noise."""
        return self.comparison.test if self.comparison else "exact"


@dataclass
class Refusal:
    """A Δ the report will not give, and why."""
    reason: str


@dataclass
class Verdict:
    cell: str
    metric: str
    expected: str
    observed: str | None
    verdict: str  # agrees | disagrees | inconclusive
    change: Change | None = None
    reason: str = ""


@dataclass
class Report:
    title: str
    rows: list[Row]
    keys: list[str]  # config keys that differ between cells
    metrics: list[str]
    baseline: str | None
    verdicts: list[Verdict]
    spec: ReportSpec = field(default_factory=ReportSpec)
    show_runs: bool = False  # several runs of a cell: label each with its run id
    unpaired_requested: bool = False  # `report --unpaired`: per-example scores left unread
    # `report --masks`: replicated cell -> its masks' agreement across seeds, or why there is none
    masks: dict[str, Any] = field(default_factory=dict)
    _changes: dict[tuple[int, str], Change | Refusal | None] = field(default_factory=dict)

    def row(self, cell: str) -> Row | None:
        """The cell's row (with several runs: the newest finished one)."""
        matches = [r for r in self.rows if r.cell == cell]
        return next((r for r in matches if r.status == "FINISHED"), matches[0] if matches else None)

    @property
    def base_row(self) -> Row | None:
        return self.row(self.baseline) if self.baseline else None

    def change(self, row: Row, metric: str) -> Change | Refusal | None:
        key = (id(row), metric)
        if key not in self._changes:
            base = self.base_row
            self._changes[key] = None if base is None or row is base else \
                compare(row, base, metric, self.spec)
        return self._changes[key]

    def unpaired_cells(self) -> list[str]:
        """Finished cells whose runs logged no per-example scores (judged by the unpaired rule)."""
        return [r.cell for r in self.rows if r.status == "FINISHED" and r.examples is None]

    def summary(self) -> str:
        if not self.verdicts:
            return ""
        held = sum(v.verdict == "agrees" for v in self.verdicts)
        inconclusive = sum(v.verdict == "inconclusive" for v in self.verdicts)
        correction = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}[
            self.spec.correction]
        return (f"{held} of {len(self.verdicts)} expectations hold at α = {self.spec.alpha:g} "
                f"({correction} correction)"
                + (f", {inconclusive} inconclusive" if inconclusive else ""))

    @property
    def footer(self) -> str:
        alpha = self.spec.alpha
        text = (f"Δ is the change from the baseline on the examples both cells scored: ↑/↓ when "
                f"p < {alpha:g} (exact McNemar for 0/1 scores, paired permutation otherwise), "
                f"≈ when its {100 * (1 - alpha):g}% interval (paired bootstrap; Agresti-Min for "
                "0/1 scores) lies within the metric's equivalence margin, ? when neither "
                "(always with fewer than "
                f"{mcnemar_min_discordant(alpha)} paired examples). Metrics without a noise "
                "estimate are compared as they are.")
        replicated = [r for r in self.rows if r.replicates]
        if replicated:
            counts = sorted({len(r.finished_replicates) for r in replicated})
            fewest = counts[0]
            text += (f" Replicated cells ({', '.join(map(str, counts))} seeds) show the mean over "
                     "replicates ± the within-run standard error, and the between-seed SD; "
                     "their Δ is judged across seed-paired replicates: a two-stage bootstrap "
                     "interval (seeds, then examples) and the larger p of a sign-flip "
                     "permutation over the replicate Δs and the paired test over examples, so a "
                     "verdict holds for a new seed and new examples. With "
                     f"{fewest} seeds no p is below {fmt_p(seed_floor(fewest), label=False)}"
                     + (f"; a verdict at α = {alpha:g} needs at least "
                        f"{mcnemar_min_discordant(alpha)} seeds."
                        if seed_floor(fewest) >= alpha else "."))
        if any(not r.replicates and r.status == "FINISHED" and not is_dense_reference(r.cell)
               for r in self.rows):
            text += (" Cells without replicates ran once: their intervals are conditional on "
                     "that one pruned and recovered model (a new calibration or training seed "
                     "may move them; `replicates:` in the matrix measures how far).")
        unpaired_cells = self.unpaired_cells()
        if self.unpaired_requested:
            text += (" Judged by the standard errors alone (--unpaired): a z-test on "
                     "sqrt(se² + se_baseline²), as if the cells had answered different questions.")
        elif unpaired_cells:
            text += (" No per-example scores for " + ", ".join(unpaired_cells) + ": their Δ use "
                     "the unpaired rule (z-test on the two standard errors); `sparselab run M "
                     "--rerun` re-scores them.")
        return text


def margin_of(metric: str, base_value: float, spec: ReportSpec) -> float:
    margin = spec.margin.get(metric, default_margin(metric))
    if isinstance(margin, str):
        return abs(base_value) * float(margin.strip().rstrip("%")) / 100
    return float(margin)


def compare(row: Row, base: Row, metric: str, spec: ReportSpec | None = None
            ) -> Change | Refusal | None:
    """`row`'s `metric` against the baseline's: paired when both logged per-example scores."""
    spec = spec or ReportSpec()
    value, ref = row.value(metric), base.value(metric)
    if value is None or ref is None:
        return None
    refusal = incomparable(row, base, metric)
    if refusal is not None:
        return refusal
    margin = margin_of(metric, ref, spec)
    if row.replicates or base.replicates:
        return compare_replicates(row, base, metric, spec, margin)
    scores, ref_scores = row.scores(metric), base.scores(metric)
    comparison = None
    if scores is not None and ref_scores is not None:
        comparison = paired(ref_scores, scores, row.examples.aggregate.get(metric, "mean"),
                            full_score=row.examples.full_score.get(metric), alpha=spec.alpha,
                            seed=spec.seed)
    if comparison is None:
        se, se_ref = row.stderr(metric), base.stderr(metric)
        if se is None and se_ref is None:  # a quantity without sampling noise
            delta = value - ref
            return Change(delta, "same" if delta == 0 else ("up" if delta > 0 else "down"),
                          margin=margin, speedup=speedup(metric, value, ref))
        comparison = unpaired(value, se, ref, se_ref, alpha=spec.alpha)
        if comparison is None:
            return Refusal("a standard error is zero or missing, and there are no per-example "
                           "scores to pair")
    change = Change(value - ref, "", comparison, margin, speedup=speedup(metric, value, ref))
    change.direction = judge(change, comparison.p_value, spec.alpha)
    return change


def incomparable(row: Row, base: Row, metric: str) -> Refusal | None:
    """Why two rows' `metric` cannot be compared (evaluated differently, other examples)."""
    mine, theirs = row.evaluation(metric), base.evaluation(metric)
    differs = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys()
               if mine.get(k) != theirs.get(k)}
    if differs:
        return Refusal("evaluated differently: " + "; ".join(
            f"{k.removeprefix('tag:')} {a if a is not None else '(unset)'} vs "
            f"{b if b is not None else '(unset)'}" for k, (a, b) in sorted(differs.items())))
    prints = {r.examples.fingerprint.get(metric) for x in (row, base)
              for r in (x.replicates or [x]) if r.status == "FINISHED" and r.examples}
    prints.discard(None)
    if len(prints) > 1:
        shown = sorted(p[:8] for p in prints)
        return Refusal(f"scored on different examples (data fingerprints {', '.join(shown)})")
    return None


def seed_pairs(row: Row, base: Row) -> list[tuple[Row, Row]]:
    """(baseline replicate, cell replicate) pairs that drew the same seeds; a cell run once
    (the dense reference) stands beside every replicate of the other."""
    mine = {r.replicate: r for r in row.finished_replicates} if row.replicates else {None: row}
    theirs = {r.replicate: r for r in base.finished_replicates} if base.replicates \
        else {None: base}
    if None in mine:
        return [(b, mine[None]) for b in theirs.values()]
    if None in theirs:
        return [(theirs[None], c) for c in mine.values()]
    return [(theirs[i], mine[i]) for i in sorted(mine.keys() & theirs.keys())]


def compare_replicates(row: Row, base: Row, metric: str, spec: ReportSpec,
                       margin: float) -> Change | Refusal:
    """Δ of replicated cells across their seed-paired replicates (sparselab.stats.replicated)."""
    pairs = seed_pairs(row, base)
    if not pairs:
        return Refusal("no replicate of one cell drew the seeds of a replicate of the other")
    value = sum(c.value(metric) for _, c in pairs) / len(pairs)
    ref = sum(b.value(metric) for b, _ in pairs) / len(pairs)
    scores = [(b.scores(metric), c.scores(metric)) for b, c in pairs]
    if any(s is None for pair in scores for s in pair):
        if all(r.stderr(metric) is None for pair in pairs for r in pair):
            delta = value - ref  # a quantity without sampling noise: as it is
            return Change(delta, "same" if delta == 0 else ("up" if delta > 0 else "down"),
                          margin=margin, speedup=speedup(metric, value, ref))
        return Refusal("replicates without per-example scores: `sparselab run M --rerun` "
                       "re-scores them")
    how = pairs[0][1].examples.aggregate.get(metric, "mean")
    comparison = replicated([b for b, _ in scores], [c for _, c in scores], how,
                            alpha=spec.alpha, seed=spec.seed)
    if comparison is None:
        return Refusal("the replicates share no scored example")
    change = Change(comparison.delta, "", comparison, margin,
                    speedup=speedup(metric, value, ref))
    change.direction = judge(change, comparison.p_value, spec.alpha)
    return change


def judge(change: Change, p_value: float, alpha: float) -> str:
    """up/down when significant, same when the interval lies within ± the margin, else
    unresolved (always, with fewer paired examples than any exact test at alpha needs)."""
    c = change.comparison
    if c.paired and c.n < mcnemar_min_discordant(alpha):
        return "unresolved"
    if p_value < alpha and c.delta != 0:
        return "up" if c.delta > 0 else "down"
    if change.margin is not None and -change.margin <= c.ci_low and c.ci_high <= change.margin:
        return "same"
    return "unresolved"


def quality(metric: str, direction: str | None) -> str:
    """'better' / 'worse' for an up/down change of an oriented metric, else ''."""
    sign = orientation(metric)
    if direction not in ("up", "down") or sign == 0:
        return ""
    return "better" if (direction == "up") == (sign > 0) else "worse"


def expected_direction(metric: str, expected: str) -> str | None:
    if expected in ("up", "down", "same"):
        return expected
    sign = orientation(metric)
    if sign == 0:
        return None
    return "up" if (expected == "better") == (sign > 0) else "down"


# --- reading runs back ---------------------------------------------------------------------------

def _client():
    from sparselab.tracking import _client as make
    return make()


def collect(client, experiment: str, cells: list[str] | None = None,
            parent_run: str | None = None, all_runs: bool = False) -> list[Row]:
    """Child runs of an experiment as rows: the newest run per cell and replicate (FINISHED
    preferred), or with `all_runs` every run, each cell's newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filter_string = f"tags.`mlflow.parentRunId` = '{parent_run}'" if parent_run else ""
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], max_results=5000)
    runs = [r for r in runs if "sparselab.cell" in r.data.tags]
    by_id: dict[str, list[Any]] = {}
    for run in runs:  # newest first
        by_id.setdefault(cell_id(run.data.tags), []).append(run)
    if not all_runs:  # the newest FINISHED, else the newest of any status
        by_id = {name: [next((r for r in group if r.info.status == "FINISHED"), group[0])]
                 for name, group in by_id.items()}
    by_cell: dict[str, list[Any]] = {}
    for group in by_id.values():  # a cell's replicates in order of their index
        by_cell.setdefault(group[0].data.tags["sparselab.cell"], []).extend(group)
    for group in by_cell.values():
        group.sort(key=lambda r: int(r.data.tags.get("sparselab.replicate", -1)))
    order = list(dict.fromkeys(cells)) if cells is not None else []
    order += [name for name in by_cell if name not in order
              and (cells is None or all_runs)]
    rows = []
    for name in order:
        group = by_cell.get(name)
        rows += [_row(r) for r in group] if group else [Row(name, "NOT RUN", None)]
    rows.sort(key=lambda r: not is_dense_reference(r.cell))  # stable: the order above stays
    return rows


def _row(run) -> Row:
    replicate = run.data.tags.get("sparselab.replicate")
    return Row(run.data.tags["sparselab.cell"], run.info.status, run.info.run_id,
               with_evaluation_defaults(dict(run.data.params)), run_metrics(run),
               dict(run.data.tags), replicate=None if replicate is None else int(replicate))


def group_replicates(rows: list[Row]) -> list[Row]:
    """A replicated cell's runs as one row (`Row.of_replicates`) where each replicate appears
    once (with --all, a replicate run several times stays one row per run)."""
    out, groups = [], {}
    for row in rows:
        if row.replicate is None:
            out.append(row)
            continue
        if row.cell not in groups:
            groups[row.cell] = []
            out.append(row.cell)  # its place in the order
        groups[row.cell].append(row)
    grouped = []
    for item in out:
        if isinstance(item, Row):
            grouped.append(item)
            continue
        runs = groups[item]
        indices = [r.replicate for r in runs]
        grouped += [Row.of_replicates(runs)] if len(set(indices)) == len(indices) else runs
    return grouped


def with_evaluation_defaults(params: dict[str, str]) -> dict[str, str]:
    """A run logged before an evaluation setting existed (`evaluate.sample`) was evaluated as
    its default says; fill such keys in (where the run logged the section) so that runs old and
    new compare."""
    out = dict(params)
    for key, value in _evaluation_defaults().items():
        section = key.rsplit(".", 1)[0] + "."
        if key not in out and any(k.startswith(section) for k in params) \
                and not isinstance(value, (dict, list)):
            out[key] = str(value)
    return out


@functools.cache
def _evaluation_defaults() -> dict[str, Any]:
    from sparselab.matrix import AnswerLoss, Evaluate, flatten
    defaults = {"evaluate." + k: v for k, v in flatten(Evaluate().model_dump(mode="json")).items()}
    defaults.update({"evaluate.answer_loss." + k: v for k, v in
                     flatten(AnswerLoss().model_dump(mode="json")).items()})
    return defaults


def load_examples(client, rows: list[Row]) -> None:
    """Fill each finished row's per-example scores from its runs' stage artifacts."""
    import os
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for row in [r for row in rows for r in (row.replicates or [row])]:
        if row.status != "FINISHED" or row.run_id is None:
            continue
        merged, found = ExampleScores(), False
        for role in EVALUATION_ROLES:
            if f"sparselab.stage.{role}.key" not in row.tags:
                continue
            with tempfile.TemporaryDirectory(prefix="sparselab-report-") as tmp:
                try:
                    path = client.download_artifacts(
                        row.run_id, f"stages/{role}/{EXAMPLES_FILE}", tmp)
                except Exception:  # noqa: BLE001 - an older run without them
                    continue
                merged.merge(ExampleScores.read(Path(path)).renamed(
                    lambda metric, role=role: role_metric(role, metric)))
                found = True
        row.examples = merged if found else None


def load_masks(report: Report, cache) -> None:
    """Each replicated cell's mask agreement across its seeds (sparselab.prune.agreement), from
    its replicates' pruned models in `cache`; a reason where they cannot be read."""
    from sparselab.prune.agreement import mask_agreement
    for row in report.rows:
        if not row.replicates:
            continue
        keys = list(dict.fromkeys(r.tags.get("sparselab.stage.prune.key")
                                  for r in row.finished_replicates))
        if None in keys:
            report.masks[row.cell] = "not pruned"
            continue
        if len(keys) < 2:
            report.masks[row.cell] = "its replicates share one pruned model"
            continue
        entries = [cache.entry("prune", key) for key in keys]
        if any(e is None or not (e.path / "model").is_dir() for e in entries):
            report.masks[row.cell] = f"pruned models not in the stage cache {cache.root}"
            continue
        report.masks[row.cell] = mask_agreement([e.path / "model" for e in entries])


def mask_rows(report: Report) -> list[list[str]]:
    out = []
    for cell, found in report.masks.items():
        if isinstance(found, str):
            out.append([cell, "", "", "", "", found])
            continue
        lowest = min(found.per_layer, key=found.per_layer.get)
        highest = max(found.per_layer, key=found.per_layer.get)
        out.append([cell, str(found.models), f"{found.overall:.3f}", f"{found.chance:.3f}",
                    f"{found.per_layer[lowest]:.3f} (layer {lowest}) – "
                    f"{found.per_layer[highest]:.3f} (layer {highest})", ""])
    return out


MASK_HEADER = ["cell", "seeds", "mask agreement", "by chance", "per layer (lowest – highest)",
               "note"]


def differing_keys(rows: list[Row]) -> list[str]:
    """Config keys whose values differ between the (non-dense) cells that ran and have them.

    A key with a value in some cell takes its sub-keys from the others into its column
    (`prune.calibration.data`: wikitext2 | mix={...}); an empty dict (`{}`) gives its column
    to the sub-keys beside it."""
    ran = [r for r in rows if r.params and not is_dense_reference(r.cell)]
    keys = sorted({k for r in ran for k in r.params})
    valued = {k for k in keys if any(r.params.get(k, "{}") != "{}" for r in ran)}
    parents = {k for k in keys if any(other.startswith(k + ".") for other in keys)}
    columns = [k for k in keys if not (k in parents and k not in valued)
               and not any(k.startswith(parent + ".") for parent in parents & valued)]
    # a cell without the key (its section's method is `none`: no LoRA settings) neither adds a
    # value nor makes the key differ; its method's own column shows the difference
    def has(row: Row, key: str) -> bool:  # the key, a sub-key, or a parent (an empty dict)
        return any(p == key or p.startswith(key + ".") or key.startswith(p + ".")
                   for p in row.params)
    return [k for k in columns if len({r.setting(k) for r in ran if has(r, k)}) > 1]


def build(rows: list[Row], title: str, metrics: list[str], baseline: str | None,
          expect: dict[str, dict[str, str]] | None = None, where: dict[str, str] | None = None,
          spec: ReportSpec | None = None) -> Report:
    if not rows:
        raise UserError(f"no runs found for {title}; run it first: sparselab run MATRIX")
    rows = group_replicates(rows)
    available = sorted({m for r in rows for m in r.metrics if not m.endswith("_stderr")})
    for metric in metrics:
        if metric not in available:
            raise UserError("--metrics: " + unknown_name("metric", metric, available))
    names = [r.cell for r in rows]
    if baseline is not None and baseline not in names:
        raise UserError(f"report.baseline '{baseline}' is not a cell of {title}; cells: "
                        f"{', '.join(dict.fromkeys(names))}.", key="report.baseline")
    if where:
        rows = [r for r in rows if r.cell == baseline or is_dense_reference(r.cell)
                or all(r.setting(k) == v for k, v in where.items())]
    spec = spec or ReportSpec()
    report = Report(title, rows, differing_keys(rows), metrics, baseline, [], spec,
                    show_runs=len(set(names)) < len(names))
    for cell, expectations in (expect or {}).items():
        for metric, expected in expectations.items():
            row = report.row(cell) or next((r for r in rows if r.cell.split("[")[0] == cell), None)
            change = report.change(row, metric) if row else None
            if isinstance(change, Refusal):
                reason = change.reason
            elif change is None:
                reason = ("not measured" if row is None or row.status == "FINISHED"
                          else f"the cell is {row.status.lower()}")
            else:
                reason = ""
            report.verdicts.append(Verdict(cell, metric, expected, None, "inconclusive",
                                           change if isinstance(change, Change) else None,
                                           reason))
    _judge_family(report)
    return report


def _judge_family(report: Report) -> None:
    """Correct the expectations' p-values as one family, then judge each."""
    spec = report.spec
    tested = [v for v in report.verdicts if v.change and v.change.comparison]
    adjusted = adjust([v.change.p_value for v in tested], spec.correction)
    for verdict, p_adj in zip(tested, adjusted):
        verdict.change.p_adjusted = p_adj  # the table shows the hypothesis as judged
        verdict.change.direction = judge(verdict.change, p_adj, spec.alpha)
    for verdict in report.verdicts:
        change = verdict.change
        if change is None:
            continue
        verdict.observed = change.direction
        want = expected_direction(verdict.metric, verdict.expected)
        if want is None:
            verdict.reason = f"'{verdict.expected}' has no meaning for {verdict.metric}"
        elif change.direction == "unresolved":
            verdict.reason = resolution_text(change, len(tested), spec.alpha)
        elif want == "same":
            verdict.verdict = "agrees" if change.direction == "same" else "disagrees"
        else:
            verdict.verdict = "agrees" if change.direction == want else "disagrees"


def resolution_text(change: Change, family: int = 1, alpha: float = 0.05) -> str:
    """What a comparison could detect and, unresolved, what would resolve it; `family`: the
    number of hypotheses it is corrected with (a replicated one's seeds must beat that too)."""
    c = change.comparison
    if c is None:
        return ""
    parts = []
    if c.seeds is not None:
        return _seed_resolution(change, family, alpha)
    if c.mde is not None:
        parts.append("no effect is detectable with these examples" if math.isinf(c.mde)
                     else f"detects |Δ| ≥ {fmt(c.mde)}")
    if change.direction == "unresolved" and c.n_needed is not None:
        parts.append(f"this Δ needs ~{c.n_needed} examples" if c.paired
                     else "this Δ needs more examples")
    return "; ".join(parts)


def _seed_resolution(change: Change, family: int, alpha: float) -> str:
    """What a replicated comparison could resolve, and what more it needs: seeds (at least
    enough for the permutation floor to pass the family's correction) or examples."""
    c, s = change.comparison, change.comparison.seeds
    parts = [f"{s.replicates} seeds: p ≥ {fmt_p(s.p_floor, label=False)}"
             + (f", seed SD of Δ {fmt(s.sd)}" if s.sd is not None else "")
             + f", example SE {fmt(s.se_examples)} ({s.dominant} dominate)"]
    if c.mde is not None:
        parts.append("no effect is detectable with these seeds" if math.isinf(c.mde)
                     else f"detects |Δ| ≥ {fmt(c.mde)}")
    if change.direction == "unresolved":
        floor_seeds = mcnemar_min_discordant(alpha / family)  # 2/2^R below alpha / family
        seeds = max(s.seeds_needed, floor_seeds) if s.seeds_needed else None
        needs = ([f"~{seeds} seeds"] if seeds and seeds > s.replicates else []) + \
            ([f"~{c.n_needed} examples"] if c.n_needed and c.n_needed > c.n
             and s.replicates >= floor_seeds else [])
        if s.seeds_needed and s.p_seeds <= s.p_floor and s.replicates < floor_seeds:
            parts.append(f"every seed agrees, but {s.replicates} seeds cannot pass "
                         f"{'the correction over ' + str(family) if family > 1 else 'alpha'}")
        parts.append("this Δ needs " + " or ".join(needs) if needs
                     else "this Δ needs more seeds and more examples")
    return "; ".join(parts)


# --- rendering -----------------------------------------------------------------------------------

def fmt(value: float | None) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "∞"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}".rstrip("0").rstrip(".")


def fmt_p(p: float | None, label: bool = True) -> str:
    if p is None:
        return ""
    text = "<0.001" if p < 0.001 else f"{p:.2g}"
    return ("p" + ("" if text.startswith("<") else "=") + text) if label else text


def change_text(metric: str, change: Change | Refusal | None, with_p: bool = True
                ) -> tuple[str, str]:
    """The Δ text ('+10 ↑ better p=0.003', 'not comparable') and its tone: better | worse | ''."""
    if change is None:
        return "", ""
    if isinstance(change, Refusal):
        return "not comparable", ""
    tone = quality(metric, change.direction)
    text = f"{change.delta:+.4g} {ARROWS[change.direction]}"
    if change.speedup is not None:
        text += f" ×{change.speedup:.2f}"
    if tone:
        text += " " + tone
    if with_p and change.comparison is not None:
        text += " " + fmt_p(change.p_value)
    return text, tone


def row_label(report: Report, row: Row) -> str:
    return f"{row.cell} ({row.run_id[:8]})" if report.show_runs and row.run_id else row.cell


def cells_text(report: Report, row: Row, metric: str, with_p: bool = True
               ) -> tuple[str, str, str]:
    """'value ± se', the Δ text and its tone for one metric of one row (status when not run)."""
    if row.status != "FINISHED":
        return (row.status.lower(), "", "")
    value = row.value(metric)
    if value is None:
        return ("–", "", "")
    se = row.stderr(metric)
    text = fmt(value) + (f" ± {fmt(se)}" if se is not None else "")
    if row.replicates:
        spread = row.spread(metric)
        text += (f", seed SD {fmt(spread)}" if spread is not None else "") + \
            f" ({len(row.finished_replicates)} seeds)"
    return (text, *change_text(metric, report.change(row, metric), with_p))


def table_rows(report: Report, with_p: bool = True
               ) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Header and body of the main table; each body cell is (text, tone)."""
    header = ["cell", *report.keys]
    for metric in report.metrics:
        header += [metric, "Δ"]
    body = []
    for row in report.rows:
        dense = is_dense_reference(row.cell)  # unpruned: the cells' settings do not apply
        line = [(row_label(report, row), "")] + [("" if dense else row.setting(k), "")
                                                   for k in report.keys]
        for metric in report.metrics:
            value, delta, tone = cells_text(report, row, metric, with_p)
            line += [(value, ""), (delta, tone)]
        body.append(line)
    return header, body


HYPOTHESIS_HEADER = ["cell", "metric", "expected", "Δ", "CI", "p", "p adj.", "test", "n",
                     "resolution", "verdict"]


def hypothesis_rows(report: Report) -> list[list[str]]:
    out = []
    for v in report.verdicts:
        c = v.change.comparison if v.change else None
        observed = ""
        if v.change:
            observed = f"{v.change.delta:+.4g} {ARROWS[v.change.direction]}"
            tone = quality(v.metric, v.change.direction)
            observed += f" {tone}" if tone else ""
        out.append([v.cell, v.metric, f"{ARROWS.get(v.expected, '')} {v.expected}".strip(),
                    observed, f"[{fmt(c.ci_low)}, {fmt(c.ci_high)}]" if c else "",
                    fmt_p(c.p_value, label=False) if c else "",
                    fmt_p(v.change.p_adjusted, label=False) if c else "",
                    v.change.test if v.change else "", str(c.n) if c and c.n else "",
                    v.reason or (resolution_text(v.change) if v.change else ""), v.verdict])
    return out


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body])


def to_markdown(report: Report) -> str:
    header, body = table_rows(report)
    lines = [f"### {report.title}", ""] + _md_table(header, [[t for t, _ in r] for r in body])
    lines += ["", f"Baseline: `{report.baseline}`. {report.footer}" if report.baseline
              else report.footer]
    if report.verdicts:
        lines += ["", f"**{report.summary()}**", ""] + _md_table(HYPOTHESIS_HEADER,
                                                               hypothesis_rows(report))
    if report.masks:
        lines += ["", "Mask agreement across seeds: the Jaccard index of the pruned weights, "
                  "pooled over every pair of seeds (1: every seed removed the same weights; "
                  "'by chance': independent draws at that sparsity).", ""]
        lines += _md_table(MASK_HEADER, mask_rows(report))
    return "\n".join(lines) + "\n"


TIDY_COLUMNS = ["cell", "run_id", "status", "metric", "value", "stderr", "replicates",
                "seed_sd", "n", "delta", "ci_low", "ci_high", "p_value", "p_adjusted", "test",
                "p_seeds", "p_examples", "p_floor", "direction", "quality", "margin", "mde",
                "n_needed", "seeds_needed", "expected", "verdict", "note"]


def tidy(report: Report):
    """One row per cell × metric (pandas DataFrame): value, noise, Δ, interval, p-values,
    verdicts, resolution; config keys that differ as `config.<key>` columns."""
    import pandas as pd
    expectations = {(v.cell, v.metric): v for v in report.verdicts}
    base = report.base_row
    records = []
    for row in report.rows:
        for metric in report.metrics:
            change = report.change(row, metric)
            hypothesis = expectations.get((row.cell, metric)) if row is report.row(row.cell) \
                else None
            c = change.comparison if isinstance(change, Change) else None
            s = c.seeds if c else None
            record: dict[str, Any] = {
                "cell": row.cell, "run_id": row.run_id, "status": row.status, "metric": metric,
                "value": row.value(metric), "stderr": row.stderr(metric),
                "replicates": len(row.finished_replicates) if row.replicates else 1,
                "seed_sd": row.spread(metric) if row.replicates else None,
                "p_seeds": s.p_seeds if s else None, "p_examples": s.p_examples if s else None,
                "p_floor": s.p_floor if s else None,
                "seeds_needed": s.seeds_needed if s else None,
                "n": c.n if c else None,
                "delta": change.delta if isinstance(change, Change) else None,
                "ci_low": c.ci_low if c else None, "ci_high": c.ci_high if c else None,
                "p_value": c.p_value if c else None,
                "p_adjusted": change.p_adjusted if isinstance(change, Change) else None,
                "test": change.test if isinstance(change, Change) else None,
                "direction": change.direction if isinstance(change, Change) else None,
                "quality": quality(metric, change.direction) or None
                if isinstance(change, Change) else None,
                "margin": change.margin if isinstance(change, Change) else None,
                "mde": c.mde if c and c.mde is not None and not math.isinf(c.mde) else None,
                "n_needed": c.n_needed if c else None,
                "expected": hypothesis.expected if hypothesis else None,
                "verdict": hypothesis.verdict if hypothesis else None,
                "note": change.reason if isinstance(change, Refusal) else
                ("baseline" if row is base else None)}
            record.update({f"config.{k}": ("" if is_dense_reference(row.cell) else row.setting(k))
                           for k in report.keys})
            records.append(record)
    columns = TIDY_COLUMNS[:3] + [f"config.{k}" for k in report.keys] + TIDY_COLUMNS[3:]
    frame = pd.DataFrame.from_records(records, columns=columns)
    for column in ("n", "n_needed", "replicates", "seeds_needed"):
        frame[column] = frame[column].astype("Int64")
    return frame


def to_csv(report: Report) -> str:
    return tidy(report).to_csv(index=False)


def to_json(report: Report) -> str:
    frame = tidy(report).astype(object)
    records = frame.where(frame.notna(), None).to_dict(orient="records")  # full precision
    return json.dumps({"title": report.title, "baseline": report.baseline,
                       "alpha": report.spec.alpha, "correction": report.spec.correction,
                       "rows": records,
                       "expectations": [{"cell": v.cell, "metric": v.metric,
                                         "expected": v.expected, "observed": v.observed,
                                         "verdict": v.verdict, "reason": v.reason}
                                        for v in report.verdicts],
                       "paired": not report.unpaired_cells(),
                       "unpaired_cells": report.unpaired_cells(),
                       "summary": report.summary(), "rule": report.footer,
                       "masks": {cell: found if isinstance(found, str) else
                                 {"seeds": found.models, "agreement": found.overall,
                                  "chance": found.chance,
                                  "per_layer": {str(k): v for k, v in found.per_layer.items()}}
                                 for cell, found in report.masks.items()}}, indent=2)


TONE_COLOURS = {"better": "#1a7f37", "worse": "#cf222e"}


def to_html(report: Report) -> str:
    header, body = table_rows(report)
    esc = html.escape

    def cell(text: str, tone: str = "") -> str:
        style = f" style='color:{TONE_COLOURS[tone]}'" if tone in TONE_COLOURS else ""
        return f"<td{style}>{esc(text)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(cell(t, tone) for t, tone in row) + "</tr>" for row in body)
    hypotheses = ""
    if report.verdicts:
        hyp_head = "".join(f"<th>{esc(h)}</th>" for h in HYPOTHESIS_HEADER)
        hyp_rows = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>"
                           for row in hypothesis_rows(report))
        hypotheses = (f"<p><b>{esc(report.summary())}</b></p>"
                      f"<table><tr>{hyp_head}</tr>{hyp_rows}</table>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body>"
            f"<h3>{esc(report.title)}</h3><table><tr>{head}</tr>{rows}</table>"
            f"<p>{esc(report.footer)}</p>{hypotheses}</body></html>\n")


RICH_TONES = {"better": "green", "worse": "red"}


def to_rich(report: Report):
    """The main table and, when the matrix has expectations, the hypotheses table (rich)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    header, body = table_rows(report, with_p=False)  # narrow: p-values in the hypotheses
    table = Table(title=report.title, caption=report.footer)
    for column in header:
        table.add_column(column, justify="left" if column in ("cell", *report.keys) else "right")
    for row in body:
        table.add_row(*(f"[{RICH_TONES[tone]}]{escape(text)}[/]" if tone in RICH_TONES
                        else escape(text) for text, tone in row))
    parts = [table]
    if report.masks:
        masks = Table(title="mask agreement across seeds (Jaccard of the pruned weights)")
        for column in MASK_HEADER:
            masks.add_column(column)
        for row in mask_rows(report):
            masks.add_row(*map(escape, row))
        parts.append(masks)
    if not report.verdicts:
        return Group(*parts) if len(parts) > 1 else table
    hypotheses = Table(title=report.summary())
    for column in HYPOTHESIS_HEADER:
        hypotheses.add_column(column)
    colours = {"agrees": "green", "disagrees": "red", "inconclusive": "yellow"}
    for row in hypothesis_rows(report):
        hypotheses.add_row(*map(escape, row[:-1]), f"[{colours[row[-1]]}]{row[-1]}[/]")
    return Group(*parts, hypotheses)


def pivot(report: Report, rows_key: str, cols_key: str, metric: str) -> tuple[list[str], list[list[str]]]:
    """A two-way table of one metric (e.g. calibration data × fine-tuning data)."""
    ran = [r for r in report.rows if r.params and not is_dense_reference(r.cell)]
    for key in (rows_key, cols_key):
        if not any(r.setting(key) for r in ran):
            valid = sorted({k for r in ran for k in r.params})
            raise UserError("--pivot: " + unknown_name("config key", key, valid))
    row_values = sorted({r.setting(rows_key) for r in ran})
    col_values = sorted({r.setting(cols_key) for r in ran})
    header = [f"{rows_key} \\ {cols_key}", *col_values]
    body = []
    for rv in row_values:
        line = [rv]
        for cv in col_values:
            match = [r for r in ran if r.setting(rows_key) == rv and r.setting(cols_key) == cv]
            line.append(" / ".join(cells_text(report, r, metric)[0] for r in match))
        body.append(line)
    return header, body


def spans_orders(values: list[float]) -> bool:
    """A log axis reads better: positive values more than 100x apart (a broken cell next to
    good ones)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def plot(report: Report, file: Path) -> None:
    """One panel per metric (at most PLOT_COLUMNS to a row), one bar per cell, stderr as error
    bars, a replicated cell's seeds as dots over its bar (the mean); a log axis where the cells'
    values span more than two orders of magnitude."""
    from sparselab.plots import plt
    cells = [r for r in report.rows if r.status == "FINISHED"]
    columns = min(len(report.metrics), PLOT_COLUMNS)
    rows = math.ceil(len(report.metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.4),
                             squeeze=False)
    for ax in axes.flat[len(report.metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, report.metrics):
        values = [r.value(metric) or 0.0 for r in cells]
        errors = [r.stderr(metric) or 0.0 for r in cells]
        ax.bar(range(len(cells)), values, yerr=errors, capsize=3,
               color=["#999999" if is_dense_reference(r.cell) else "#4c72b0" for r in cells])
        for x, row in enumerate(cells):  # a replicated cell: each seed's value, the spread
            draws = [v for r in row.finished_replicates if (v := r.value(metric)) is not None]
            if draws:
                ax.scatter([x] * len(draws), draws, s=9, color="#222222", zorder=3)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([row_label(report, r) for r in cells], rotation=60, ha="right",
                           fontsize=7)
        ax.set_title(metric, fontsize=9)
        if spans_orders([v for r in cells if (v := r.value(metric)) is not None]):
            ax.set_yscale("log")
    fig.suptitle(report.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def pareto_axes(report: Report) -> tuple[str, str] | None:
    """The speed metric and the quality metric an accuracy-versus-speed plot sets against each
    other: the report's first latency or throughput metric and its first other metric that has
    a better side; None when the report lacks either."""
    speed = next((m for m in report.metrics if SPEED.match(m)), None)
    other = next((m for m in report.metrics if not m.startswith("speed.") and orientation(m)),
                 None)
    return (speed, other) if speed and other else None


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The cells no other cell beats on both axes (each oriented so higher is better), in order
    of the first axis."""
    front = [name for name, (x, y) in points.items()
             if not any(ox >= x and oy >= y and (ox > x or oy > y)
                        for other, (ox, oy) in points.items() if other != name)]
    return sorted(front, key=lambda name: points[name][0])


def plot_pareto(report: Report, file: Path) -> bool:
    """Accuracy against speed-up over the baseline, one point per cell, the Pareto front drawn
    through the cells nothing beats on both. False (nothing drawn) without the two metrics."""
    from sparselab.plots import plt
    axes = pareto_axes(report)
    base = report.base_row
    if axes is None or base is None or base.value(axes[0]) is None:
        return False
    speed, other = axes
    points = {r.cell: (speedup(speed, r.value(speed), base.value(speed)), r.value(other))
              for r in report.rows if r.status == "FINISHED"
              and r.value(speed) is not None and r.value(other) is not None}
    sign = orientation(other)
    front = pareto_front({name: (x, sign * y) for name, (x, y) in points.items()})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (x, y) in points.items():
        ax.scatter(x, y, color="#999999" if is_dense_reference(name) else "#4c72b0", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "--", color="#c44e52",
            zorder=2, label="Pareto front")
    ax.axvline(1.0, color="#cccccc", linewidth=0.8, zorder=1)
    if spans_orders([y for _, y in points.values()]):
        ax.set_yscale("log")
    ax.set_xlabel(f"speed-up over {base.cell} ({speed}, x)")
    ax.set_ylabel(other + (" (lower is better)" if sign < 0 else " (higher is better)"))
    ax.set_title(f"{report.title}: accuracy against speed", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return True

