"""`sparselab report`: the matrix's MLflow runs as one comparison table, read from the tracking store.

Rows are cells (the dense reference first), leading columns the config keys that differ between
cells, then each metric with ± stderr and its change against the baseline cell. A change counts as
up or down only when it is larger than the combined standard error sqrt(se_cell² + se_base²);
otherwise it is `same` (≈). Metrics without a standard error (perplexity, sparsity) are compared
exactly. The `expect:` block of the matrix is judged against these verdicts.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselab.errors import UserError, unknown_name
from sparselab.matrix import is_dense_reference

ARROWS = {"up": "↑", "down": "↓", "same": "≈"}
PLOT_COLUMNS = 4
IGNORED_PARAMS = ("seed", "prune.calibration.seed", "recover.train.seed", "evaluate.seed")


@dataclass
class Row:
    cell: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | NOT RUN
    run_id: str | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric) if self.status == "FINISHED" else None

    def stderr(self, metric: str) -> float | None:
        return self.metrics.get(metric + "_stderr") if self.status == "FINISHED" else None

    def setting(self, key: str) -> str:
        """The cell's value of a config key; a key logged only as sub-keys (a data mix logs
        `prune.calibration.data.mix`) reads as those, so every cell has a value in its column."""
        if key in self.params:
            return self.params[key]
        prefix = key + "."
        return ", ".join(f"{k[len(prefix):]}={v}" for k, v in sorted(self.params.items())
                         if k.startswith(prefix))


@dataclass
class Change:
    delta: float
    noise: float | None  # combined standard error, None when unknown
    direction: str  # up | down | same


@dataclass
class Verdict:
    cell: str
    metric: str
    expected: str
    observed: str | None
    verdict: str  # agrees | disagrees | inconclusive


@dataclass
class Report:
    title: str
    rows: list[Row]
    keys: list[str]  # config keys that differ between cells
    metrics: list[str]
    baseline: str | None
    verdicts: list[Verdict]

    def row(self, cell: str) -> Row | None:
        return next((r for r in self.rows if r.cell == cell), None)

    def change(self, row: Row, metric: str) -> Change | None:
        base = self.row(self.baseline) if self.baseline else None
        if base is None or row is base:
            return None
        return compare(row, base, metric)

    def summary(self) -> str:
        if not self.verdicts:
            return ""
        held = sum(v.verdict == "agrees" for v in self.verdicts)
        inconclusive = sum(v.verdict == "inconclusive" for v in self.verdicts)
        return (f"{held} of {len(self.verdicts)} expectations hold"
                + (f" ({inconclusive} inconclusive)" if inconclusive else ""))

    footer = ("Δ is the change from the baseline; ↑/↓ only when larger than the combined standard "
              "error sqrt(se² + se_baseline²), else ≈ (same). Metrics without a standard error are "
              "compared exactly.")


def compare(row: Row, base: Row, metric: str) -> Change | None:
    value, ref = row.value(metric), base.value(metric)
    if value is None or ref is None:
        return None
    delta = value - ref
    se, se_ref = row.stderr(metric), base.stderr(metric)
    noise = math.sqrt(se ** 2 + se_ref ** 2) if se is not None and se_ref is not None else None
    threshold = noise if noise is not None else 0.0
    direction = "same" if abs(delta) <= threshold else ("up" if delta > 0 else "down")
    return Change(delta, noise, direction)


# --- reading runs back ---------------------------------------------------------------------------

def _client():
    from sparselab.tracking import _client as make
    return make()


def collect(client, experiment: str, cells: list[str] | None = None,
            parent_run: str | None = None, all_runs: bool = False) -> list[Row]:
    """Child runs of an experiment as rows: the newest run per cell (FINISHED preferred)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filter_string = f"tags.`mlflow.parentRunId` = '{parent_run}'" if parent_run else ""
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], max_results=5000)
    runs = [r for r in runs if "sparselab.cell" in r.data.tags]
    rows: list[Row] = []
    if all_runs:
        rows = [_row(r) for r in runs]
    else:
        chosen: dict[str, Any] = {}
        for run in runs:  # newest first: keep the newest FINISHED, else the newest of any status
            name = run.data.tags["sparselab.cell"]
            if name not in chosen or (chosen[name].info.status != "FINISHED"
                                      and run.info.status == "FINISHED"):
                chosen[name] = run
        rows = [_row(r) for r in chosen.values()]
    if cells is not None:
        by_name = {r.cell: r for r in rows}
        rows = [by_name.get(name, Row(name, "NOT RUN", None)) for name in cells]
        rows += [r for r in by_name.values() if r.cell not in cells and all_runs]
    rows.sort(key=lambda r: (not is_dense_reference(r.cell),))
    return rows


def _row(run) -> Row:
    return Row(run.data.tags["sparselab.cell"], run.info.status, run.info.run_id,
               dict(run.data.params), dict(run.data.metrics))


def differing_keys(rows: list[Row]) -> list[str]:
    """Config keys whose values differ between the (non-dense) cells that ran.

    A key with a value in some cell takes its sub-keys from the others into its column
    (`prune.calibration.data`: wikitext2 | mix={...}); an empty dict (`{}`) gives its column
    to the sub-keys beside it."""
    ran = [r for r in rows if r.params and not is_dense_reference(r.cell)]
    keys = sorted({k for r in ran for k in r.params})
    valued = {k for k in keys if any(r.params.get(k, "{}") != "{}" for r in ran)}
    parents = {k for k in keys if any(other.startswith(k + ".") for other in keys)}
    columns = [k for k in keys if k not in IGNORED_PARAMS
               and not (k in parents and k not in valued)
               and not any(k.startswith(parent + ".") for parent in parents & valued)]
    return [k for k in columns if len({r.setting(k) for r in ran}) > 1]


def build(rows: list[Row], title: str, metrics: list[str], baseline: str | None,
          expect: dict[str, dict[str, str]] | None = None, where: dict[str, str] | None = None
          ) -> Report:
    if not rows:
        raise UserError(f"no runs found for {title}; run it first: sparselab run MATRIX")
    available = sorted({m for r in rows for m in r.metrics if not m.endswith("_stderr")})
    for metric in metrics:
        if metric not in available:
            raise UserError("--metrics: " + unknown_name("metric", metric, available))
    names = [r.cell for r in rows]
    if baseline is not None and baseline not in names:
        raise UserError(f"report.baseline '{baseline}' is not a cell of {title}; cells: "
                        f"{', '.join(names)}.", key="report.baseline")
    if where:
        rows = [r for r in rows if r.cell == baseline or is_dense_reference(r.cell)
                or all(r.setting(k) == v for k, v in where.items())]
    report = Report(title, rows, differing_keys(rows), metrics, baseline, [])
    for cell, expectations in (expect or {}).items():
        for metric, expected in expectations.items():
            row = report.row(cell) or next((r for r in rows if r.cell.split("[")[0] == cell), None)
            change = report.change(row, metric) if row else None
            observed = change.direction if change else None
            if change is None:
                verdict = "inconclusive"
            else:
                verdict = "agrees" if observed == expected else "disagrees"
            report.verdicts.append(Verdict(cell, metric, expected, observed, verdict))
    return report


# --- rendering -----------------------------------------------------------------------------------

def fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}".rstrip("0").rstrip(".")


def cells_text(report: Report, row: Row, metric: str) -> tuple[str, str]:
    """'value ± se' and 'Δ arrow' for one metric of one row (status text when it did not run)."""
    if row.status != "FINISHED":
        return (row.status.lower(), "")
    value = row.value(metric)
    if value is None:
        return ("–", "")
    se = row.stderr(metric)
    text = fmt(value) + (f" ± {fmt(se)}" if se is not None else "")
    change = report.change(row, metric)
    delta = f"{change.delta:+.4g} {ARROWS[change.direction]}" if change else ""
    return text, delta


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["cell", *report.keys]
    for metric in report.metrics:
        header += [metric, "Δ"]
    body = []
    for row in report.rows:
        dense = is_dense_reference(row.cell)  # unpruned: the cells' settings do not apply
        line = [row.cell] + ["" if dense else row.setting(k) for k in report.keys]
        for metric in report.metrics:
            line += list(cells_text(report, row, metric))
        body.append(line)
    return header, body


def verdict_lines(report: Report) -> list[str]:
    return [f"{v.cell} {v.metric}: expected {ARROWS[v.expected]} {v.expected}, observed "
            f"{ARROWS[v.observed] + ' ' + v.observed if v.observed else 'nothing'} → {v.verdict}"
            for v in report.verdicts]


def to_markdown(report: Report) -> str:
    header, body = table_rows(report)
    lines = [f"### {report.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    lines += ["", f"Baseline: `{report.baseline}`. {report.footer}" if report.baseline
              else report.footer]
    if report.verdicts:
        lines += ["", f"**{report.summary()}**", ""] + [f"- {line}" for line in verdict_lines(report)]
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    header, body = table_rows(report)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    return out.getvalue()


def to_json(report: Report) -> str:
    rows = []
    for row in report.rows:
        entry = {"cell": row.cell, "status": row.status, "run_id": row.run_id,
                 "config": {k: row.setting(k) for k in report.keys}, "metrics": {}}
        for metric in report.metrics:
            change = report.change(row, metric)
            entry["metrics"][metric] = {
                "value": row.value(metric), "stderr": row.stderr(metric),
                "delta": change.delta if change else None,
                "noise": change.noise if change else None,
                "direction": change.direction if change else None}
        rows.append(entry)
    return json.dumps({"title": report.title, "baseline": report.baseline, "rows": rows,
                       "expectations": [v.__dict__ for v in report.verdicts],
                       "summary": report.summary(), "rule": report.footer}, indent=2)


def to_html(report: Report) -> str:
    header, body = table_rows(report)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    verdicts = "".join(f"<li>{esc(line)}</li>" for line in verdict_lines(report))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body>"
            f"<h3>{esc(report.title)}</h3><table><tr>{head}</tr>{rows}</table>"
            f"<p>{esc(report.footer)}</p>"
            + (f"<p><b>{esc(report.summary())}</b></p><ul>{verdicts}</ul>" if verdicts else "")
            + "</body></html>\n")


def to_rich(report: Report):
    from rich.table import Table
    header, body = table_rows(report)
    table = Table(title=report.title, caption=report.footer)
    for column in header:
        table.add_column(column, justify="left" if column in ("cell", *report.keys) else "right")
    for row in body:
        table.add_row(*row)
    return table


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


def plot(report: Report, file: Path) -> None:
    """One panel per metric (at most PLOT_COLUMNS to a row), one bar per cell, stderr as error
    bars."""
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
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([r.cell for r in cells], rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    fig.suptitle(report.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
