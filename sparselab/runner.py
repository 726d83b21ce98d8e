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
from sparselab.data.catalog import DataSource
from sparselab.evaluate.examples import role_metric
from sparselab.matrix import Cell, sample_indices
from sparselab.models import (LoadedModel, compute_device_name, load_model, model_source,
                              save_model)
from sparselab.registry import DATASETS, PRUNING, RECOVERY
from sparselab.stages import CellPlan, Stage
from sparselab.tracking import current_names, environment_tags, split_stderr

log = logging.getLogger("sparselab")

TIME_METRICS = {"load": "time.load_s", "prune": "time.prune_s", "recover": "time.recover_s",
                "perplexity": "time.perplexity_s", "answer_loss": "time.answer_loss_s",
                "tasks": "time.tasks_s"}


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
        entry = self.cache.entry(stage.kind, stage.key)
        if entry is not None:
            return entry
        with self.cache.lock(stage.kind, stage.key):
            entry = self.cache.entry(stage.kind, stage.key)  # another runner may have made it
            if entry is not None:
                return entry
            parent_model = self._take(stage.parent, plan) if stage.kind in ("prune", "recover") \
                else (self.model(stage.parent, plan) if stage.parent else None)
            self.on_stage(stage.label)
            log.info("stage %s %s: computing (%s)", stage.kind, stage.key, stage.label)
            meta = {"label": stage.label, "config": stage.config,
                    "parent": stage.parent.key if stage.parent else None}
            with self.cache.writing(stage.kind, stage.key, meta) as out:
                start = time.perf_counter()
                produced = COMPUTE[stage.kind](stage, plan, parent_model, out)
                metrics = json.loads((out / "metrics.json").read_text()) \
                    if (out / "metrics.json").is_file() else {}
                metrics[TIME_METRICS[stage.kind]] = time.perf_counter() - start
                (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.computed.add(stage.key)
            if produced is not None:
                self._held = (stage.key, produced)
            log.info("stage %s %s: done in %.1fs", stage.kind, stage.key,
                     metrics[TIME_METRICS[stage.kind]])
            return self.cache.entry(stage.kind, stage.key)

    def model(self, stage: Stage, plan: CellPlan) -> LoadedModel:
        """The model a stage produced, from memory, from the cache, or computed now."""
        if self._held and self._held[0] == stage.key:
            return self._held[1]
        entry = self.ensure(stage, plan)
        if self._held and self._held[0] == stage.key:
            return self._held[1]
        if not stage.external:  # its weights are about to be used: hash them in full first
            entry = self.cache.entry(stage.kind, stage.key, full=True) or self.ensure(stage, plan)
            if self._held and self._held[0] == stage.key:  # it was damaged and is recomputed
                return self._held[1]
        self._held = None  # free the memory of the old model before loading the next
        cfg = plan.cell.config
        if stage.kind == "load" and stage.external:
            loaded = model_source(cfg.model).load(cfg.dtype, cfg.trust_remote_code)
        elif stage.kind == "recover":
            method = RECOVERY.get(stage.config["method"])()
            loaded = method.load(lambda: self._take(stage.parent, plan), entry.path, cfg.dtype)
        else:
            loaded = load_model(entry.path / "model", dtype=cfg.dtype,
                                trust_remote_code=cfg.trust_remote_code)
        self._held = (stage.key, loaded)
        return loaded

    def _take(self, stage: Stage, plan: CellPlan) -> LoadedModel:
        loaded = self.model(stage, plan)
        self._held = None
        return loaded


# --- what each stage computes ----------------------------------------------------------------
# Each writes metrics.json and artifacts/ into `out`; model stages also save the model there
# and return it, so the next stage of the cell need not read it back.

def _write_metrics(out: Path, metrics: dict[str, float]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _model_stats(loaded: LoadedModel, out: Path) -> dict[str, float]:
    from sparselab.prune.layers import sparsity_report
    from sparselab.plots import plot_layer_sparsity
    per_layer, overall = sparsity_report(loaded.model)
    rows = ["layer,zeros,total,sparsity"] + [
        f"{name},{s['zeros']},{s['total']},{s['sparsity']:.6f}" for name, s in per_layer.items()]
    (out / "artifacts" / "layer_sparsity.csv").write_text("\n".join(rows) + "\n")
    plot_layer_sparsity(per_layer, out / "artifacts" / "layer_sparsity.png")
    return overall


def compute_load(stage: Stage, plan: CellPlan, _parent, out: Path) -> LoadedModel:
    cfg = plan.cell.config
    source = model_source(cfg.model)
    if stage.external:
        loaded = source.load(cfg.dtype, cfg.trust_remote_code)
    else:
        source.build(out / "model")
        loaded = load_model(out / "model", dtype=cfg.dtype)
        if cfg.dtype != "float32":  # store in the dtype the cell asked for
            save_model(loaded, out / "model")
    from sparselab.prune.layers import sparsity_report
    _write_metrics(out, sparsity_report(loaded.model)[1])
    return loaded


def compute_prune(stage: Stage, plan: CellPlan, loaded: LoadedModel, out: Path) -> LoadedModel:
    from sparselab.prune.base import PruneContext
    cfg = plan.cell.config
    method = PRUNING.get(cfg.prune.method)()
    extra = method.prune(loaded, PruneContext(cfg, plan.source, out / "artifacts", log,
                                              model_key=stage.parent.key, cache=StageCache()))
    metrics = {**_model_stats(loaded, out), **extra}
    save_model(loaded, out / "model")
    _write_metrics(out, metrics)
    return loaded


def compute_recover(stage: Stage, plan: CellPlan, loaded: LoadedModel, out: Path) -> LoadedModel:
    from sparselab.recover.base import RecoverContext
    cfg = plan.cell.config
    method = RECOVERY.get(cfg.recover.method)()
    ctx = RecoverContext(cfg, plan.source, out / "artifacts", log)
    if not stage.parent.external:
        # an adapter records its base by this name: the (pruned) model it was trained on, not
        # the folder the dense weights were first read from
        base = StageCache().root / "stages" / stage.parent.kind / stage.parent.key / "model"
        loaded.model.name_or_path = loaded.model.config._name_or_path = str(base.resolve())
    recovered, extra = method.recover(loaded, ctx)
    method.save(recovered, out)
    (out / "steps.json").write_text(json.dumps(ctx.step_metrics))
    _write_metrics(out, {**_model_stats(recovered, out), **extra})
    return recovered


def compute_perplexity(stage: Stage, plan: CellPlan, loaded: LoadedModel, out: Path) -> None:
    from sparselab.evaluate.examples import ExampleScores, example_id, fingerprint
    from sparselab.evaluate.perplexity import summarise, window_losses, windows_of
    ppl = plan.cell.config.evaluate.perplexity
    dataset = DATASETS.get(ppl.data)()
    text = dataset.text(plan.source, dataset.eval_split)
    windows = windows_of(loaded.tokenizer, text, ppl.seqlen, ppl.max_windows)
    nll = window_losses(loaded.model, windows, ppl.batch_size)
    scores = ExampleScores()
    scores.add(f"{ppl.data}.ppl", (example_id(ppl.data, "window", i) for i in range(len(nll))),
               nll, "exp_mean", fingerprint=fingerprint(windows.numpy().tobytes()))
    scores.write(out / "artifacts")
    result = summarise(nll, ppl.seqlen)
    metrics = {f"{ppl.data}.ppl": result["ppl"], f"{ppl.data}.ppl_tokens": result["tokens"]}
    if "ppl_stderr" in result:  # one window has no spread
        metrics[f"{ppl.data}.ppl_stderr"] = result["ppl_stderr"]
    _write_metrics(out, metrics)


def compute_answer_loss(stage: Stage, plan: CellPlan, loaded: LoadedModel, out: Path) -> None:
    from sparselab.evaluate.answer_loss import example_losses, summarise
    from sparselab.evaluate.examples import ExampleScores, example_id, fingerprint
    cfg = plan.cell.config.evaluate.answer_loss
    metrics = {}
    scores = ExampleScores()
    for name in cfg.data:
        dataset = DATASETS.get(name)()
        split = dataset.examples(plan.source, dataset.eval_split)
        indices = sample_indices(len(split), cfg.limit, cfg.sample, cfg.seed)
        examples = [split[i] for i in indices]
        losses, tokens = example_losses(loaded.model, loaded.tokenizer, examples, cfg.seqlen,
                                        cfg.batch_size)
        metrics.update({f"{name}.{key}": value for key, value in summarise(losses, tokens).items()})
        scored = fingerprint(json.dumps(examples).encode())
        for score, values in losses.items():  # keyed by the example's index in the split
            scores.add(f"{name}.{score}_nll",
                       (example_id(name, "example", indices[i]) for i in values),
                       values.values(), fingerprint=scored)
    scores.write(out / "artifacts")
    _write_metrics(out, metrics)


def compute_tasks(stage: Stage, plan: CellPlan, loaded: LoadedModel, out: Path) -> None:
    from sparselab.evaluate.harness import evaluate_tasks
    cfg = plan.cell.config
    _write_metrics(out, evaluate_tasks(loaded, cfg, plan.source, out / "artifacts",
                                       gen_kwargs=cfg.evaluate.gen_kwargs or None))


COMPUTE = {"load": compute_load, "prune": compute_prune, "recover": compute_recover,
           "perplexity": compute_perplexity, "answer_loss": compute_answer_loss,
           "tasks": compute_tasks}


# --- cells -----------------------------------------------------------------------------------

@dataclass
class CellOutcome:
    cell: Cell
    status: str  # FINISHED | FAILED | SKIPPED | KILLED
    run_id: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def cell_metrics(plan: CellPlan, entries: dict[str, Entry]) -> dict[str, float]:
    """The DESIGN §5 metrics of a cell from its stage entries."""
    metrics: dict[str, float] = {}
    evaluate_s = 0.0
    for role, entry in entries.items():
        values = entry.metrics
        if role == "perplexity_pruned":
            metrics.update({role_metric(role, k): v for k, v in values.items()
                            if ".ppl" in k and not k.startswith("time.")})
            continue
        for key, value in values.items():
            if key in ("time.perplexity_s", "time.answer_loss_s", "time.tasks_s"):
                evaluate_s += value
            else:
                metrics[key] = value
    if {"perplexity", "answer_loss", "tasks"} & entries.keys():
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
                    "sparselab.experiment": cell.experiment or "",
                    "sparselab.data_source": self.plan.source.label, **environment_tags(),
                    **(tags or {})}
        for role, stage in self.plan.roles():
            all_tags[f"sparselab.stage.{role}.key"] = stage.key
        self.run_id = self.tracker.start_run(cell.name, all_tags, self.parent_id)
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
                log.error("cell %s failed:\n%s", self.plan.cell.name, trace)
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
                   for role, hit in hits.items()}, **(tags or {})})
            metrics = cell_metrics(self.plan, entries)
            values, stderr_tags = split_stderr(metrics)
            self.tracker.log_metrics(run_id, values)
            self.tracker.set_tags(run_id, stderr_tags)
            if "recover" in entries:
                steps = json.loads((entries["recover"].path / "steps.json").read_text())
                for name in sorted({k for step in steps for k in step}):
                    self.tracker.log_series(run_id, name, [s[name] for s in steps if name in s])
            self.tracker.mark_latest({self.plan.cell.name: run_id})
        except KeyboardInterrupt:
            self.close("KILLED", log_text)
            raise
        except Exception as exc:  # noqa: BLE001 - a cell that cannot be recorded fails alone
            trace = traceback.format_exc()
            log.error("cell %s: recording its results failed:\n%s", self.plan.cell.name, trace)
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
    """Where this process computes: host and device (DESIGN §8: runs say where they ran)."""
    import socket
    return {"host": socket.gethostname(), "device": compute_device_name()}
