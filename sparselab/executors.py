"""Executors: who computes a matrix's stages. The driver process always does the tracking.

`local` runs cells one after another in this process, handing models from stage to stage in memory.
`ray` turns every stage that is not cached yet into one Ray task, submitted once its parent stage
is in the cache: a prune shared by five cells runs once and their recoveries fan out after it.
Workers read and write the stage cache (`$SPARSELAB_HOME`, which must be a path every node sees);
only the driver talks to MLflow, so a SQLite store never sees two writers and a server sees one
client per invocation.

Two invocations on the same matrix (or two workers reaching one key) are kept apart by the cache's
per-key file lock (`fcntl` locks: they hold on local disks and NFSv4; on object-store mounts without
locking, run one driver per matrix); within one invocation the driver submits each key once.
"""
from __future__ import annotations

import io
import logging
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselab import progress
from sparselab.cache import StageCache
from sparselab.errors import Interrupted, UserError
from sparselab.runner import (LOG_FORMAT, CellOutcome, CellRun, StageRunner, placement,
                              third_party_output)
from sparselab.stages import CellPlan, Stage

log = logging.getLogger("sparselab")

# Environment a Ray worker needs to see what the driver sees (offline mode, data folder, device).
FORWARDED_ENV = ("SPARSELAB_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS")


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While running, SIGTERM (a scheduler or `kill` stopping the job) and SIGINT, even when the
    shell started us in the background with SIGINT ignored, interrupt like Ctrl-C: the open runs
    are marked KILLED and no partial stage is cached. Ray installs its own SIGTERM handler (a bare
    exit) when it connects, so the Ray executor enters this after connecting."""
    def interrupt(signum, _frame):
        raise Interrupted(f"signal {signum}")
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Events:
    """What an executor tells the command line as it goes."""
    cell_started: Callable[[str], None] = lambda name: None
    stage: Callable[[str], None] = lambda label: None
    stage_progress: Callable[[int, int, str], None] = lambda done, total, unit: None
    cell_done: Callable[[CellOutcome], None] = lambda outcome: None


class LocalExecutor:
    """Cells one after another in this process (the default; needs nothing but sparselab)."""

    def __init__(self, cache: StageCache, quiet: bool = True):
        self.cache = cache
        self.quiet = quiet  # third-party output to the cells' logs, not the terminal

    def run(self, cells: list[CellRun], events: Events) -> list[CellOutcome]:
        runner = StageRunner(self.cache, on_stage=events.stage)
        outcomes = []
        with interrupt_on_signals(), progress.listening(events.stage_progress):
            for cell in cells:
                events.cell_started(cell.plan.cell.id)
                outcomes.append(cell.execute(runner, self.quiet))
                events.cell_done(outcomes[-1])
        return outcomes


@dataclass
class StageResult:
    """What a Ray task sends back: where it ran, its log, and the error if it failed."""
    placement: dict[str, str]
    log: str
    error: str | None = None
    trace: str = ""
    computed: bool = True  # False: another runner made the entry while this task waited


def compute_stage(stage: Stage, plan: CellPlan, home: str, cwd: str) -> StageResult:
    """The body of a Ray task: compute one stage into the shared cache (its parent is there)."""
    import ray
    if os.path.isdir(cwd):  # relative model folders in the matrix mean the driver's directory
        os.chdir(cwd)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(LOG_FORMAT)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    context = ray.get_runtime_context()
    where = {**placement(), "ray_task_id": context.get_task_id() or "",
                 "ray_node_id": context.get_node_id() or ""}
    runner = StageRunner(StageCache(Path(home)))
    try:
        with third_party_output(buffer):  # the libraries' output joins the stage's log
            runner.ensure(stage, plan)
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the cells
        trace = traceback.format_exc()
        log.error("stage %s %s failed:\n%s", stage.kind.name, stage.key, trace)
        return StageResult(where, buffer.getvalue(), f"{type(exc).__name__}: {exc}", trace)
    finally:
        log.removeHandler(handler)
    return StageResult(where, buffer.getvalue(), computed=stage.key in runner.computed)


@dataclass
class _Schedule:
    """The driver's view of one invocation: stages to compute, running, done and failed."""
    todo: dict[str, tuple[Stage, CellPlan]]
    done: set[str] = field(default_factory=set)
    failed: dict[str, StageResult] = field(default_factory=dict)
    results: dict[str, StageResult] = field(default_factory=dict)

    def state(self, key: str) -> str:
        if key in self.failed:
            return "failed"
        if key in self.done or key not in self.todo:
            return "done"
        return "pending"


class RayExecutor:
    """Stages as Ray tasks; without an address a local Ray instance is started (and stopped)."""

    def __init__(self, cache: StageCache, address: str | None = None, cpus_per_cell: float = 1,
                 gpus_per_cell: float = 0, max_concurrent: int | None = None, retries: int = 0):
        self.cache = cache
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell
        self.max_concurrent = max_concurrent
        self.retries = retries

    def run(self, cells: list[CellRun], events: Events) -> list[CellOutcome]:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'sparselab[ray]' (the local "
                            "executor needs nothing more).", key="--executor") from None
        home = str(self.cache.root.resolve())
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        env["SPARSELAB_HOME"] = home
        ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, ignore_reinit_error=True)
        try:
            with interrupt_on_signals():
                return self._run(ray, cells, events, home)
        finally:
            ray.shutdown()

    def _run(self, ray, cells: list[CellRun], events: Events, home: str) -> list[CellOutcome]:
        hits = {id(cell): {role: stage.entry(self.cache) is not None
                           for role, stage in cell.plan.roles()} for cell in cells}
        schedule = _Schedule({stage.key: (stage, cell.plan) for cell in cells
                              for role, stage in cell.plan.roles() if not hits[id(cell)][role]})
        address = ray.get_runtime_context().gcs_address
        for cell in cells:
            cell.start({"sparselab.executor": "ray", "sparselab.ray.address": address})
            events.cell_started(cell.plan.cell.id)
        task = ray.remote(compute_stage).options(
            num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
            max_retries=self.retries, retry_exceptions=False)
        waiting = list(schedule.todo)
        running: dict[Any, str] = {}
        open_cells = list(cells)
        outcomes: list[CellOutcome] = []

        def settle_ready() -> None:
            for cell in list(open_cells):
                outcome = self._settle(cell, schedule, hits[id(cell)])
                if outcome is not None:
                    open_cells.remove(cell)
                    outcomes.append(outcome)
                    events.cell_done(outcome)

        try:
            settle_ready()  # cells whose stages were all cached before any task ran
            while waiting or running:
                for key in list(waiting):
                    if self.max_concurrent and len(running) >= self.max_concurrent:
                        break
                    stage, plan = schedule.todo[key]
                    parent = schedule.state(stage.parent.key) if stage.parent else "done"
                    if parent == "failed":
                        waiting.remove(key)
                        schedule.failed[key] = StageResult(
                            {}, "", f"not run: its parent stage ({stage.parent.label}) failed")
                    elif parent == "done":
                        waiting.remove(key)
                        running[task.remote(stage, plan, home, os.getcwd())] = key
                events.stage("running: " + "; ".join(schedule.todo[k][0].label
                                                     for k in running.values()) if running else "")
                if running:
                    ready, _ = ray.wait(list(running), num_returns=1)
                    for ref in ready:
                        self._collect(ray, ref, running.pop(ref), schedule)
                settle_ready()
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            for cell in open_cells:
                cell.close("KILLED", "")
            raise
        return outcomes

    @staticmethod
    def _collect(ray, ref, key: str, schedule: _Schedule) -> None:
        stage = schedule.todo[key][0]
        try:
            result: StageResult = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, node lost)
            result = StageResult({}, "", f"{type(exc).__name__}: the Ray worker computing "
                                         f"{stage.label} died", str(exc))
        schedule.results[key] = result
        if result.error:
            schedule.failed[key] = result
            log.error("stage %s failed: %s", stage.label, result.error)
        else:
            schedule.done.add(key)

    def _settle(self, cell: CellRun, schedule: _Schedule,
                hits: dict[str, bool]) -> CellOutcome | None:
        """Fail a cell as soon as one of its stages failed, finish it once all are done;
        None while it waits."""
        roles = cell.plan.roles()
        states = [schedule.state(stage.key) for _, stage in roles]
        if "pending" in states and "failed" not in states:
            return None
        logs = "".join(schedule.results[stage.key].log for _, stage in roles
                       if stage.key in schedule.results)
        tags = {f"sparselab.stage.{role}.{name}": value for role, stage in roles
                if stage.key in schedule.results
                for name, value in schedule.results[stage.key].placement.items()}
        if "failed" in states:
            first = next(stage for (_, stage), state in zip(roles, states) if state == "failed")
            result = schedule.failed[first.key]
            return cell.fail(f"{first.label}: {result.error}", result.trace, logs, tags)
        entries = {role: stage.entry(self.cache) for role, stage in roles}
        hits = {role: hits[role] or (stage.key in schedule.results
                                     and not schedule.results[stage.key].computed)
                for role, stage in roles}
        return cell.finish(entries, hits, logs, tags)
