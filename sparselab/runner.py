"""Runs cells: materialises their stages through the cache and records each cell as an MLflow run.

One failed cell never stops the others (it is marked FAILED with its traceback); Ctrl-C marks the
current runs KILLED and leaves no half-written cache entry.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TextIO

import yaml

from sparselab.cache import Entry, StageCache
from sparselab.evaluate.examples import role_metric
from sparselab.matrix import Cell
from sparselab.models import LoadedModel, compute_device_name
from sparselab.provenance import describe
from sparselab.stages import PRUNED_ROLE, CellPlan, Stage, StageContext
from sparselab.tracking import current_names, environment_tags, split_stderr

log = logging.getLogger("sparselab")

class StageRunner:
    """Computes or fetches stage entries, holding at most one model in memory.

    A model handed to a stage that modifies it (prune, recover) leaves the memory slot, so a model
    held in memory is always the one its key names.
    """

    def __init__(self, cache: StageCache, on_stage: Callable[[str], None] = lambda _: None):
        self.cache = cache
        self.on_stage = on_stage
        self._held: tuple[str, LoadedModel] | None = None
        # keys this runner computed itself: an entry another runner made while this one waited
        # on its lock is a cache hit, not a miss
        self.computed: set[str] = set()

    def ensure(self, stage: Stage, plan: CellPlan) -> Entry:
        kind = stage.kind
        entry = stage.entry(self.cache)
        if entry is not None:
            return entry
        with self.cache.lock(kind.name, stage.key):
            entry = stage.entry(self.cache)  # another runner may have made it
            if entry is not None:
                return entry
            parent_model = None
            if stage.parent is not None:  # a model stage modifies its input: take it
                parent_model = self._take(stage.parent, plan) if kind.produces_model \
                    else self.model(stage.parent, plan)
            self.on_stage(stage.label)
            log.info("stage %s %s: computing (%s)", kind.name, stage.key, stage.label)
            meta = {"label": stage.label, "config": stage.config,
                    "parent": stage.parent.key if stage.parent else None,
                    "code": stage.code.record()}
            with self.cache.writing(kind.name, stage.key, meta) as out:
                start = time.perf_counter()
                from sparselab.onload import placed
                whole = parent_model is not None and not kind.onloads_for(stage.section)
                with placed(parent_model.model if whole else None, whole):
                    produced = kind.compute(stage.section, parent_model,
                                            self._context(stage, plan, out))
                metrics = json.loads((out / "metrics.json").read_text()) \
                    if (out / "metrics.json").is_file() else {}
                metrics[kind.time_metric] = time.perf_counter() - start
                (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.computed.add(stage.key)
            if produced is not None:
                self._held = (stage.key, produced)
            log.info("stage %s %s: done in %.1fs", kind.name, stage.key, metrics[kind.time_metric])
            return stage.entry(self.cache)

    def _context(self, stage: Stage, plan: CellPlan, out: Path) -> StageContext:
        parent = stage.parent
        folder = None if parent is None or parent.external else \
            self.cache.root / "stages" / parent.kind.name / parent.key
        return StageContext(plan.source, out, plan.models, parent, folder, stage.config,
                            read_model=lambda earlier: self.reference_model(earlier, plan))

    def reference_model(self, stage: Stage, plan: CellPlan) -> LoadedModel:
        """A stage's model read from its entry beside the model in hand (not held: the dense
        reference a reconstruction compares with); computed first if its entry is missing."""
        entry = self.ensure(stage, plan)
        return stage.kind.read(stage.section, entry.path, self._context(stage, plan, entry.path),
                               lambda: self._take(stage.parent, plan))

    def model(self, stage: Stage, plan: CellPlan) -> LoadedModel:
        """The model a stage produced, from memory, from the cache, or computed now."""
        if self._held and self._held[0] == stage.key:
            return self._held[1]
        entry = self.ensure(stage, plan)
        if self._held and self._held[0] == stage.key:
            return self._held[1]
        if not stage.external:  # its weights are about to be used: hash them in full first
            entry = stage.entry(self.cache, full=True) or self.ensure(stage, plan)
            if self._held and self._held[0] == stage.key:  # it was damaged and is recomputed
                return self._held[1]
        self._held = None  # free the memory of the old model before loading the next
        loaded = stage.kind.read(stage.section, entry.path, self._context(stage, plan, entry.path),
                                 lambda: self._take(stage.parent, plan))
        self._held = (stage.key, loaded)
        return loaded

    def _take(self, stage: Stage, plan: CellPlan) -> LoadedModel:
        loaded = self.model(stage, plan)
        self._held = None
        return loaded


# --- cells -----------------------------------------------------------------------------------

@dataclass
class CellOutcome:
    cell: Cell
    status: str  # FINISHED | FAILED | SKIPPED | KILLED
    run_id: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def cell_metrics(plan: CellPlan, entries: dict[str, Entry]) -> dict[str, float]:
    """A cell's metrics from its stage entries (by role); the evaluations' times add up to
    `time.evaluate_s`."""
    metrics: dict[str, float] = {}
    evaluate_s, evaluated = 0.0, False
    stages = dict(plan.roles())
    for role, entry in entries.items():
        values = entry.metrics
        if role == PRUNED_ROLE:
            metrics.update({role_metric(role, k): v for k, v in values.items()
                            if ".ppl" in k and not k.startswith("time.")})
            continue
        kind = stages[role].kind
        for key, value in values.items():
            if key == kind.time_metric and not kind.produces_model:
                evaluate_s, evaluated = evaluate_s + value, True
            else:
                metrics[key] = value
    if evaluated:
        metrics["time.evaluate_s"] = evaluate_s
    return current_names(metrics)


class CellRun:
    """One cell as one MLflow child run: started, then finished from its stage entries or failed.

    The local executor computes the stages in between (`execute`); the Ray executor computes them
    on workers and calls `finish` / `fail` in the driver, so every tracking write comes from one
    process.
    """

    def __init__(self, tracker, parent_id: str, plan: CellPlan, matrix_name: str):
        self.tracker = tracker
        self.parent_id = parent_id
        self.plan = plan
        self.matrix_name = matrix_name
        self.run_id: str | None = None

    def start(self, tags: dict[str, str] | None = None) -> str:
        cell = self.plan.cell
        all_tags = {"sparselab.matrix": self.matrix_name, "sparselab.cell": cell.name,
                    "sparselab.cell_hash": cell.hash,
                    **({} if cell.replicate is None
                       else {"sparselab.replicate": str(cell.replicate)}),
                    "sparselab.experiment": cell.experiment or "",
                    "sparselab.data_source": self.plan.source.label, **environment_tags(),
                    **(tags or {})}
        for role, stage in self.plan.roles():
            all_tags[f"sparselab.stage.{role}.key"] = stage.key
        self.run_id = self.tracker.start_run(cell.id, all_tags, self.parent_id)
        self.tracker.log_params(self.run_id, cell.config.flat())
        with TemporaryDirectory(prefix="sparselab-cell-") as tmp:
            config_file = Path(tmp) / "cell_config.yaml"
            config_file.write_text(yaml.safe_dump(cell.config.model_dump(mode="json"),
                                                  sort_keys=False))
            self.tracker.log_artifact(self.run_id, config_file)
        return self.run_id

    def execute(self, runner: StageRunner, quiet: bool = True) -> CellOutcome:
        """Start the run, compute or fetch every stage here, and finish (or fail) the run.
        `quiet`: third-party output (warnings, progress bars) goes to the cell's log only."""
        self.start({f"sparselab.{name}": value for name, value in placement().items()})
        with TemporaryDirectory(prefix="sparselab-cell-") as tmp:
            log_file = Path(tmp) / "cell.log"
            handler = logging.FileHandler(log_file)
            handler.setFormatter(LOG_FORMAT)
            log.addHandler(handler)
            try:
                entries, before = {}, set(runner.computed)
                with third_party_output(handler.stream) if quiet else nullcontext():
                    for role, stage in self.plan.roles():
                        entries[role] = runner.ensure(stage, self.plan)
                computed_here = runner.computed - before
                hits = {role: stage.key not in computed_here for role, stage in self.plan.roles()}
            except KeyboardInterrupt:
                log.warning("interrupted")
                self._detach(handler)
                self.close("KILLED", log_file.read_text())
                raise
            except Exception as exc:  # noqa: BLE001 - a failed cell must not stop the others
                trace = traceback.format_exc()
                log.error("cell %s failed:\n%s", self.plan.cell.id, trace)
                self._detach(handler)
                return self.fail(exc, trace, log_file.read_text())
            self._detach(handler)
            return self.finish(entries, hits, log_file.read_text())

    def finish(self, entries: dict[str, Entry], hits: dict[str, bool], log_text: str,
               tags: dict[str, str] | None = None) -> CellOutcome:
        """Log the cell's metrics and stage artifacts from its (now cached) stage entries.

        Recording is part of the cell's failure isolation: an unreadable entry file fails this
        cell (the others run on), a signal meanwhile marks it KILLED; it is never left RUNNING."""
        run_id = self.run_id
        try:
            for role, entry in entries.items():
                self.tracker.log_artifacts(run_id, entry.artifacts, f"stages/{role}")
            self.tracker.set_tags(run_id, {
                **{f"sparselab.stage.{role}.cache": "hit" if hit else "miss"
                   for role, hit in hits.items()},
                **{f"sparselab.stage.{role}.code": describe(entry.meta.get("code"))
                   for role, entry in entries.items()},
                **{k: v for entry in entries.values() for k, v in entry.tags.items()},
                **(tags or {})})
            metrics = cell_metrics(self.plan, entries)
            values, stderr_tags = split_stderr(metrics)
            self.tracker.log_metrics(run_id, values)
            self.tracker.set_tags(run_id, stderr_tags)
            if "recover" in entries:
                steps = json.loads((entries["recover"].path / "steps.json").read_text())
                for name in sorted({k for step in steps for k in step}):
                    self.tracker.log_series(run_id, name, [s[name] for s in steps if name in s])
            self.tracker.mark_latest({self.plan.cell.id: run_id})
        except KeyboardInterrupt:
            self.close("KILLED", log_text)
            raise
        except Exception as exc:  # noqa: BLE001 - a cell that cannot be recorded fails alone
            trace = traceback.format_exc()
            log.error("cell %s: recording its results failed:\n%s", self.plan.cell.id, trace)
            return self.fail(f"recording the results failed: {type(exc).__name__}: {exc}",
                             trace, log_text)
        self.close("FINISHED", log_text)
        return CellOutcome(self.plan.cell, "FINISHED", run_id, metrics=metrics)

    def fail(self, exc: BaseException | str, trace: str, log_text: str,
             tags: dict[str, str] | None = None) -> CellOutcome:
        error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        with TemporaryDirectory(prefix="sparselab-cell-") as tmp:
            (Path(tmp) / "traceback.txt").write_text(trace)
            self.tracker.log_artifact(self.run_id, Path(tmp) / "traceback.txt")
        self.tracker.set_tags(self.run_id, {"sparselab.error": error[:500], **(tags or {})})
        self.close("FAILED", log_text)
        return CellOutcome(self.plan.cell, "FAILED", self.run_id, error)

    def close(self, status: str, log_text: str) -> None:
        if log_text:
            with TemporaryDirectory(prefix="sparselab-cell-") as tmp:
                (Path(tmp) / "cell.log").write_text(log_text)
                self.tracker.log_artifact(self.run_id, Path(tmp) / "cell.log", "logs")
        self.tracker.end_run(self.run_id, status)

    @staticmethod
    def _detach(handler: logging.Handler) -> None:
        log.removeHandler(handler)
        handler.close()


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")


@contextmanager
def third_party_output(stream: TextIO) -> Iterator[None]:
    """Send what the libraries print while stages run (lm-eval's and datasets' warnings,
    transformers' and tqdm's bars, Python warnings) to `stream`, the cell's log, instead of the
    terminal; sparselab's own console keeps the stream it was given."""
    import warnings
    stream.flush()
    with warnings.catch_warnings(), redirect_stdout(stream), redirect_stderr(stream):
        warnings.simplefilter("default")  # each distinct warning once, into the log
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            stream.write(warnings.formatwarning(message, category, filename, lineno, line))
        try:
            yield
        finally:
            stream.flush()


def placement() -> dict[str, str]:
    """Where this process computes: host and device (tags, so a run says where it ran)."""
    import socket
    return {"host": socket.gethostname(), "device": compute_device_name()}
