"""The `sparselab` command: validate, plan, run, ls, ui, cache."""
from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from sparselab.errors import Interrupted, UserError, unknown_name
from sparselab.study import prepare_plans

console = Console()
if not console.is_terminal:  # files and pipes get the whole table, not 80 columns
    console = Console(width=200)


class Command(click.Group):
    """Turns UserError into one clear paragraph and exit code 2, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            print_error(exc)
            sys.exit(2)


def print_error(exc: UserError) -> None:
    """Bad input as one paragraph, no traceback."""
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)


@click.group(cls=Command)
@click.option("-v", "--verbose", is_flag=True, help="Log stage details to the terminal.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Prune LLMs, recover them, evaluate them: one YAML matrix in, comparable MLflow runs out."""
    ctx.obj = {"verbose": verbose}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # read when transformers / huggingface_hub are imported (lazily, by the stages): our
    # progress display, not theirs
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    console.file = sys.stdout  # bound now: stages redirect sys.stdout to the cell's log
    console_logging(verbose)


def console_logging(verbose: bool) -> None:
    """sparselab's log on the console: warnings always, every message with -v."""
    logging.getLogger("sparselab").setLevel(logging.INFO)
    # MLflow's INFO lines (creating a store's tables) are its business, not the user's; the
    # variable counts when mlflow is first imported, the level if it already was
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    logging.getLogger("mlflow").setLevel(level)
    from rich.logging import RichHandler
    # warnings (a damaged cache entry set aside, a store being waited for) always reach the
    # console; every message with --verbose
    logger = logging.getLogger("sparselab")
    for old in [h for h in logger.handlers if getattr(h, "sparselab_console", False)]:
        logger.removeHandler(old)  # one per process, however often main() is invoked
    handler = RichHandler(console=console, show_path=False, show_time=verbose,
                          level=logging.INFO if verbose else logging.WARNING)
    if not verbose:  # errors reach the console as the run's own summary (tracebacks: artifacts)
        handler.addFilter(lambda record: record.levelno == logging.WARNING)
    handler.sparselab_console = True
    logger.addHandler(handler)


_matrix_arg = click.argument("matrix", type=click.Path(dir_okay=False))
_only = click.option("--only", help="Comma-separated cell or experiment names.")
_set = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                    help="Dotted override applied to every cell (repeatable).")
_data_dir = click.option("--data-dir", help="Folder laid out like ../shared/data, or 'builtin'.")
_device_memory = click.option(
    "--device-memory", metavar="SIZE",
    help="The accelerator's memory (80GiB, 24GB): stages predicted not to fit are refused before "
         "anything loads. Default for run: the visible GPU's; on a CPU, no limit.")
_onload = click.option(
    "--onload", is_flag=True,
    help="Keep the weights on the host and move one decoder layer at a time to the accelerator "
         "(pruning walks, perplexity, answer losses, lm-eval tasks): a model larger than the "
         "accelerator runs, with the same results.")


def _memory_limit(device_memory: str | None, detect: bool) -> tuple[int | None, str]:
    """(bytes, what they are) from --device-memory, else the visible GPU's when `detect`."""
    from sparselab.footprint import parse_size
    if device_memory is not None:
        try:
            return parse_size(device_memory), "--device-memory"
        except ValueError as exc:
            raise UserError(str(exc), key="--device-memory") from None
    if detect and os.environ.get("SPARSELAB_DEVICE", "cuda").startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return None, ""


def _cell_count(plans) -> str:
    """'6 cells + dense reference', with replicates '2 cells + dense reference (6 replicate
    runs)'."""
    from sparselab.matrix import is_dense_reference
    cells = [p.cell for p in plans if not is_dense_reference(p.cell.name)]
    names = len({c.name for c in cells})
    return f"{names} cells + dense reference" + (
        "" if names == len(cells) else f" ({len(cells)} replicate runs)")


def _memory_rows(plans, onload: bool, cache=None):
    """Predicted peaks of the distinct stages (those still to run, given a cache)."""
    from sparselab.footprint import matrix_memory
    from sparselab.stages import STORED, stage_status
    rows = matrix_memory(plans, onload)
    if cache is None:
        return rows
    to_run = {s.key for p in plans for _, s in p.roles() if stage_status(s, cache) not in STORED}
    return [r for r in rows if r.key in to_run]


def _limits(command):
    """--max-cells / --max-nodes, passed on as `limits=(cells, nodes)`."""
    from sparselab.matrix import MAX_CELLS, MAX_NODES

    @functools.wraps(command)
    def wrapper(*args, max_cells: int, max_nodes: int, **kwargs):
        return command(*args, limits=(max_cells, max_nodes), **kwargs)
    wrapper = click.option("--max-nodes", type=click.IntRange(min=1), default=MAX_NODES,
                           show_default=True,
                           help="Most YAML nodes the matrix may expand to (aliases expanded).")(wrapper)
    return click.option("--max-cells", type=click.IntRange(min=1), default=MAX_CELLS,
                        show_default=True, help="Most cells the matrix may expand to.")(wrapper)


@main.command()
@click.argument("matrices", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_set
@_data_dir
@_limits
def validate(matrices, sets, data_dir, limits) -> None:
    """Check matrix files (schema, names, ranges, data files) without loading a model.
    Every file is checked; the exit code is 2 if any is bad."""
    bad = 0
    for matrix in matrices:
        try:
            mf, plans = prepare_plans(matrix, None, sets, data_dir, limits)
        except UserError as exc:
            bad += 1
            print_error(exc)
            continue
        console.print(f"[green]ok[/] {matrix}: {_cell_count(plans)}")
    if bad:
        console.print(f"{bad} of {len(matrices)} matrix files are not valid")
        sys.exit(2)


@main.command()
@_matrix_arg
@_only
@_set
@_data_dir
@_device_memory
@_onload
@_limits
def plan(matrix, only, sets, data_dir, device_memory, onload, limits) -> None:
    """List the cells, the stages each needs, which are shared and which are cached, and each
    distinct stage's predicted peak memory (refused, exit 2, if over --device-memory)."""
    from sparselab.cache import StageCache
    from sparselab.stages import STORED, kinds, stage_status
    mf, plans = prepare_plans(matrix, only, sets, data_dir, limits)
    cache = StageCache()
    users = Counter(stage.key for p in plans for _, stage in p.roles())
    table = Table(title=f"{mf.matrix.name}: {_cell_count(plans)}")
    for column in ("cell", "stage", "key", "status", "shared", "what"):
        table.add_column(column)
    for p in plans:
        for index, (role, stage) in enumerate(p.roles()):
            status = stage_status(stage, cache)
            colour = {"cached": "green", "external": "cyan"}.get(status, "yellow")
            table.add_row(p.cell.id if index == 0 else "", role, stage.key,
                          f"[{colour}]{status}[/]",
                          f"×{users[stage.key]}" if users[stage.key] > 1 else "", stage.label,
                          end_section=index == len(p.roles()) - 1)
    console.print(table)
    distinct: dict[str, set[str]] = {}
    cached: Counter = Counter()
    for p in plans:
        for _, stage in p.roles():
            if stage.key not in distinct.setdefault(stage.kind.name, set()):
                distinct[stage.kind.name].add(stage.key)
                cached[stage.kind.name] += stage_status(stage, cache) in STORED
    for kind in kinds():
        if kind.name in distinct:
            console.print(f"{kind.name}: {len(distinct[kind.name])} distinct, "
                          f"{cached[kind.name]} cached or external")
    replicated: dict[str, list] = {}
    for p in plans:
        if p.cell.replicate is not None:
            replicated.setdefault(p.cell.name, []).append(p)
    for name, group in replicated.items():  # what the seeds share: stages computed once
        shares = ", ".join(f"{len({s.key for g in group for r, s in g.roles() if r == role})} "
                           f"distinct {role}" for role, _ in group[0].roles())
        console.print(f"{name}: {len(group)} replicates ({shares})")
    _print_time(plans, cache)
    _print_memory(matrix, plans, onload, device_memory)


def _print_time(plans, cache) -> None:
    """What the stages still to run will take, from stages of the same label (the same work
    but for their seeds: another replicate's) that this cache has timed."""
    from statistics import median

    from sparselab.stages import STORED, stage_status
    timed: dict[str, list[float]] = {}
    for entry in cache.entries():
        try:
            seconds = entry.metrics.get(f"time.{entry.stage}_s")
            label = entry.meta.get("label")
        except (OSError, ValueError):
            continue
        if seconds is not None and label:
            timed.setdefault(label, []).append(seconds)
    to_run = {s.key: s for p in plans for _, s in p.roles() if stage_status(s, cache) not in STORED}
    if not to_run:
        return
    known = [median(timed[s.label]) for s in to_run.values() if s.label in timed]
    line = f"to run: {len(to_run)} stage(s)"
    if known:
        line += (f"; {len(known)} of them take about {sum(known) / 60:.1f} min together, "
                 "as stages of the same label took here")
    console.print(line + ("" if len(known) == len(to_run) else
                          f"; {len(to_run) - len(known)} without a timed twin"))


def _print_memory(matrix: str, plans, onload: bool, device_memory: str | None) -> None:
    from sparselab.footprint import HEADROOM, gib, refuse_unfit
    limit, what = _memory_limit(device_memory, detect=False)
    rows = _memory_rows(plans, onload)
    table = Table(title="predicted peak memory per distinct stage"
                  + (" (--onload)" if onload else ""))
    for column in ("cell", "stage", "accelerator", "host", "largest terms"):
        table.add_column(column)
    alike: Counter = Counter((r.label, r.need.device if r.need else None) for r in rows)
    shown = set()
    for row in rows:
        same = (row.label, row.need.device if row.need else None)
        if same in shown:  # the same stage of another lineage: one row, counted
            continue
        shown.add(same)
        cell = row.cell + (f" +{alike[same] - 1}" if alike[same] > 1 else "")
        if row.need is None:
            table.add_row(cell, row.label, "?", "?", "not predicted (no model config here)")
            continue
        over = limit is not None and row.need.device > limit * HEADROOM
        device = gib(row.need.device) + (" onloaded" if row.onloaded else "")
        table.add_row(cell, row.label, f"[red]{device}[/]" if over else device,
                      gib(row.need.host), row.need.largest(3))
    console.print(table)
    if limit is not None:
        refuse_unfit(rows, limit, what, matrix)
        console.print(f"[green]fits[/] {gib(limit)} ({what}), {HEADROOM:.0%} of it usable")


@main.command()
@_matrix_arg
@_only
@_set
@_data_dir
@click.option("--rerun", is_flag=True, help="Run cells even if an identical one has finished.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: cells one after another here; ray: stages as Ray tasks.")
@click.option("--address", help="Ray cluster (auto, ray://host:10001); default: start a local one.")
@click.option("--cpus-per-cell", type=float, default=1, show_default=True,
              help="CPUs each Ray task asks for.")
@click.option("--gpus-per-cell", type=float, default=0, show_default=True,
              help="GPUs each Ray task asks for.")
@click.option("--max-concurrent", type=click.IntRange(min=1),
              help="At most this many Ray tasks at once (default: as resources allow).")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Retry a Ray task whose worker died this many times.")
@_device_memory
@_onload
@_limits
@click.option("-v", "--verbose", is_flag=True,
              help="Log stage details and show the libraries' own output (same as sparselab -v).")
@click.pass_obj
def run(obj, verbose, matrix, only, sets, data_dir, rerun, executor, address, cpus_per_cell,
        gpus_per_cell, max_concurrent, retries, device_memory, onload, limits) -> None:
    """Run the matrix: one MLflow child run per cell under one parent run.

    The terminal shows sparselab's progress; the libraries' warnings and progress bars go to
    each cell's log (an artifact of its run). `sparselab -v run ...` shows both."""
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class CountColumn(TextColumn):
        """done/total, or nothing for a task without a total (a stage that reports none)."""
        def __init__(self):
            super().__init__("")

        def render(self, task):
            from rich.text import Text
            return Text(f"{int(task.completed)}/{int(task.total)}" if task.total else "")

    from sparselab.cache import StageCache
    from sparselab.executors import Events, LocalExecutor, RayExecutor
    from sparselab.runner import CellOutcome, CellRun
    from sparselab.tracking import Tracker, environment_tags
    verbose = verbose or obj["verbose"]
    if verbose:
        console_logging(verbose)
    ray_only = {"--address": address, "--max-concurrent": max_concurrent,
                "--gpus-per-cell": gpus_per_cell or None, "--retries": retries or None}
    if executor == "local" and any(v is not None for v in ray_only.values()):
        used = ", ".join(k for k, v in ray_only.items() if v is not None)
        raise UserError(f"{used}: only with --executor ray (the local executor runs one cell "
                        "at a time in this process).", key="--executor")
    mf, plans = prepare_plans(matrix, only, sets, data_dir, limits)
    cache = StageCache()
    limit, what = _memory_limit(device_memory, detect=True)
    if limit is not None:  # before any model loads
        from sparselab.footprint import refuse_unfit
        refuse_unfit(_memory_rows(plans, onload, cache), limit, what, matrix)
    if onload:  # read by the stages, here and in Ray's workers
        os.environ["SPARSELAB_ONLOAD"] = "1"
    cache.gc(older_than_s=math.inf)  # only what dead writers on this host left half-written
    runner = (RayExecutor(cache, address, cpus_per_cell, gpus_per_cell, max_concurrent, retries)
              if executor == "ray" else LocalExecutor(cache, quiet=not verbose))
    tracker = Tracker(mf.matrix.name)
    outcomes, pending = [], []
    start = time.perf_counter()
    for p in plans:
        previous = None if rerun else tracker.finished_cell(p.cell.hash)
        if previous:
            console.print(f"[dim]skip {p.cell.id}: finished in run {previous} "
                          "(use --rerun to run again)[/]")
            outcomes.append(CellOutcome(p.cell, "SKIPPED", previous))
        else:
            pending.append(p)
    # a skipped cell's earlier run is the result the matrix now means
    tracker.mark_latest({o.cell.id: o.run_id for o in outcomes})
    if not pending:  # nothing to do leaves no empty parent run behind
        console.print(f"{mf.matrix.name}: all {len(plans)} cells finished before; nothing to "
                      f"run (experiment '{mf.matrix.name}'; --rerun runs them again)")
        return
    parent = tracker.start_run(f"{mf.matrix.name} {time.strftime('%Y-%m-%d %H:%M:%S')}", {
        "sparselab.matrix": mf.matrix.name, "sparselab.matrix_file": str(mf.path),
        "sparselab.invocation": " ".join(sys.argv[1:]), "sparselab.executor": executor,
        **environment_tags()})
    tracker.log_artifact(parent, Path(mf.path))
    to_run = [CellRun(tracker, parent, p, mf.matrix.name) for p in pending]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  CountColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        overall = progress.add_task("cells", total=len(plans), completed=len(outcomes))
        stage_task = progress.add_task("", total=None)

        def done(outcome: CellOutcome) -> None:
            colour = "green" if outcome.status == "FINISHED" else "red"
            progress.console.print(f"[{colour}]{outcome.status.lower()}[/] {outcome.cell.id}"
                                   + (f": {outcome.error}" if outcome.error else ""))
            progress.advance(overall)

        current = {"label": ""}

        def stage_started(label: str) -> None:
            current["label"] = label
            progress.reset(stage_task, total=None, description=f"  {label}")

        def stage_progress(finished: int, total: int, unit: str) -> None:
            progress.update(stage_task, completed=finished, total=total,
                            description=f"  {current['label']}: {unit}")

        events = Events(
            cell_started=lambda name: progress.update(overall, description=f"cell {name}"),
            stage=stage_started, stage_progress=stage_progress, cell_done=done)
        try:
            outcomes += runner.run(to_run, events)
        except KeyboardInterrupt:
            tracker.end_run(parent, "KILLED")
            console.print("[red]interrupted[/]: the running cells are marked KILLED; "
                          "finished stages stay cached.")
            sys.exit(130)
    failed = [o for o in outcomes if o.status == "FAILED"]
    tracker.set_tags(parent, {"sparselab.cells": len(outcomes), "sparselab.failed": len(failed)})
    tracker.end_run(parent, "FAILED" if failed else "FINISHED")
    elapsed = time.perf_counter() - start
    counts = Counter(o.status for o in outcomes)
    console.print(f"{mf.matrix.name}: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
                  + f" in {elapsed:.1f}s (experiment '{mf.matrix.name}', parent run {parent})")
    if failed:
        console.print("[red]failed cells:[/] " + ", ".join(o.cell.id for o in failed)
                      + " (tracebacks are artifacts of their runs)")
        sys.exit(1)


@main.command()
@_matrix_arg
@click.argument("cell")
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False),
              help="A new (or empty) folder for the model.")
@click.option("--merge", is_flag=True,
              help="Fold a LoRA adapter into the weights (this fills the pruned weights in).")
@_set
@_data_dir
def export(matrix, cell, dest, merge, sets, data_dir) -> None:
    """Write a cell's final model as a Hugging Face folder with a model card (a LoRA cell: the
    pruned base plus its adapter, or merged with --merge)."""
    from sparselab.export import export_cell
    from sparselab.tracking import _client, finished_run
    mf, plans = prepare_plans(matrix, None, sets, data_dir)
    mine = [p for p in plans if p.cell.id == cell]
    if not mine:
        raise UserError("export: " + unknown_name("cell", cell, [p.cell.id for p in plans]) +
                        " (a replicated cell: name one replicate, CELL#i)", key="CELL")
    client = _client()
    experiment = client.get_experiment_by_name(mf.matrix.name)
    run_id = finished_run(client, experiment.experiment_id, mine[0].cell.hash) \
        if experiment is not None else None
    exported = export_cell(mine[0], mf.matrix.name, Path(dest), merge, run_id)
    if run_id:  # the run says where its model went; the card travels with it
        client.set_tag(run_id, "sparselab.export", str(exported.folder.resolve()))
        client.log_artifact(run_id, str(exported.folder / "README.md"), "export")
    sparsity = exported.sparsity.get("sparsity.linear")
    console.print(f"exported {cell} ({exported.kind}) to {exported.folder}"
                  + (f", sparsity.linear {sparsity:.4f}" if sparsity is not None else "")
                  + f"\nload it with: {exported.loader}", highlight=False, soft_wrap=True)


@main.command(name="ls")
def list_registered() -> None:
    """The registered pruning methods, recovery methods, datasets, tasks and models, and the
    sparsity patterns, each with what it is."""
    from sparselab.matrix import PATTERNS
    from sparselab.registry import ALL
    sections = {kind: registry.descriptions for kind, registry in ALL.items()}
    sections = {**dict(list(sections.items())[:1]), "patterns": PATTERNS,
                **dict(list(sections.items())[1:])}
    for kind, entries in sections.items():
        table = Table(title=kind, title_justify="left", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for name, about in entries.items():
            table.add_row(name, about)
        console.print(table)


@main.command()
@click.argument("matrix", required=False, type=click.Path(dir_okay=False))
@click.option("--port", default=5000, show_default=True)
def ui(matrix, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 against the project's tracking store; with MATRIX,
    print the address of its cells' latest runs, sorted by its first report metric.

    The server and its workers run in their own process group: Ctrl-C or SIGTERM stops all of
    them. The address is printed once the server answers."""
    import signal
    import urllib.request

    from sparselab.tracking import tracking_uri
    uri = tracking_uri()
    url = f"http://127.0.0.1:{port}"
    matrix_url = matrix_runs_url(url, matrix) if matrix else None  # refused before starting
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              start_new_session=True)

    def stop(signum, _frame):
        raise Interrupted(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        if server.poll() is not None:
            raise UserError(f"the MLflow UI stopped before it answered on {url} (exit code "
                            f"{server.returncode}); is port {port} in use? Try --port.",
                            key="--port")
        console.print(f"MLflow UI for {uri} on {url} (Ctrl-C stops it)")
        console.print(f"  runs of every matrix: {url}/#/experiments?{ML_VIEW}", soft_wrap=True)
        if matrix_url:
            console.print(f"  {matrix}: {matrix_url}", soft_wrap=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_group(server)


# MLflow 3 opens in its GenAI view unless told otherwise (it remembers the choice per browser)
ML_VIEW = "workflowType=machine_learning"


def matrix_runs_url(url: str, matrix: str) -> str:
    """The UI's runs table of a matrix: the latest run of every cell, one flat list sorted by
    the report's first metric (a sort other than by date also un-nests the cells from their
    invocation's parent run)."""
    from urllib.parse import quote

    from sparselab.matrix import load_matrix
    from sparselab.tracking import LATEST_TAG, _client
    mf = load_matrix(matrix)
    found = _client().get_experiment_by_name(mf.matrix.name)
    if found is None:
        raise UserError(f"no runs of '{mf.matrix.name}' in the tracking store; run it first: "
                        f"sparselab run {matrix}")
    metric = (mf.matrix.report.metrics or ["wikitext2.ppl"])[0]
    query = (f"searchFilter={quote(f'tags.`{LATEST_TAG}` = {chr(39)}true{chr(39)}')}"
             f"&orderByKey={quote(f'metrics.`{metric}`')}&orderByAsc=true&{ML_VIEW}")
    return f"{url}/#/experiments/{found.experiment_id}/runs?{query}"


def _stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process's whole group, then SIGKILL what is left after `grace_s`."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@main.group()
def cache() -> None:
    """Inspect and clean the stage cache ($SPARSELAB_HOME, default .sparselab/)."""


@cache.command(name="ls")
@click.option("--matrix", "matrices", multiple=True, type=click.Path(dir_okay=False),
              help="Name the cells of these matrices that use each entry (repeatable).")
@_data_dir
def cache_ls(matrices, data_dir) -> None:
    """List cache entries, oldest first: stage, key, when made, size, what they hold (and with
    --matrix, which cells use them)."""
    from sparselab.cache import StageCache
    store = StageCache()
    users: dict[str, list[str]] = {}
    for matrix in matrices:
        mf, plans = prepare_plans(matrix, None, (), data_dir)
        for p in plans:
            for _, stage in p.roles():
                users.setdefault(stage.key, []).append(f"{mf.matrix.name}/{p.cell.id}")
    table = Table(title=f"stage cache {store.root}")
    for column in ("stage", "key", "created", "size", "what") + (("cells",) if matrices else ()):
        table.add_column(column)
    rows = []
    for entry in store.entries():
        try:
            meta = entry.meta
            what, created = meta.get("label", ""), meta.get("created")
        except (OSError, ValueError) as exc:  # a garbled entry is listed, not a traceback
            what, created = f"[red]damaged: meta.json unreadable ({type(exc).__name__})[/]", None
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "?"
        cells = ", ".join(dict.fromkeys(users.get(entry.key, []))) or "[dim]none listed[/]"
        rows.append((created or 0, [entry.stage, entry.key, when, f"{entry.size() / 1e6:.1f} MB",
                                    what] + ([cells] if matrices else [])))
    for _, row in sorted(rows, key=lambda item: item[0]):
        table.add_row(*row)
    console.print(table)


@cache.command(name="verify")
def cache_verify() -> None:
    """Hash every file of every entry against what was written; set damaged ones aside."""
    from sparselab.cache import StageCache
    store = StageCache()
    entries = store.entries()
    bad = [e for e in entries if store.entry(e.stage, e.key, full=True) is None]
    for entry in bad:
        console.print(f"[red]damaged[/] {entry.stage}/{entry.key}: set aside to "
                      f"{store.root / 'damaged'}; the next run recomputes it")
    console.print(f"{len(entries) - len(bad)} of {len(entries)} entries intact")
    if bad:
        sys.exit(1)


@cache.command(name="rm")
@click.argument("keys", nargs=-1)
@click.option("--cell", help="Remove this cell's entries that no other cell of --matrix uses.")
@click.option("--matrix", type=click.Path(dir_okay=False), help="The matrix --cell belongs to.")
@_data_dir
def cache_rm(keys, cell, matrix, data_dir) -> None:
    """Remove entries by key (KEY..., a unique prefix is enough) or by cell (--cell NAME
    --matrix FILE); the next run recomputes them."""
    import shutil

    from sparselab.cache import StageCache
    store = StageCache()
    entries = store.entries()
    doomed = []
    for key in keys:
        found = [e for e in entries if e.key.startswith(key)]
        if len(found) != 1:
            raise UserError(f"cache rm: key '{key}' matches {len(found)} entries"
                            + (f" ({', '.join(f'{e.stage}/{e.key}' for e in found)}); give more "
                               "of it." if found else "; `sparselab cache ls` lists them."))
        doomed += found
    if cell:
        if not matrix:
            raise UserError("cache rm --cell needs --matrix, the file the cell belongs to.")
        plans = prepare_plans(matrix, None, (), data_dir)[1]
        mine = [p for p in plans if p.cell.id == cell]
        if not mine:
            raise UserError("cache rm --cell: " + unknown_name("cell", cell,
                                                                [p.cell.id for p in plans]))
        others = {stage.key for p in plans if p.cell.id != cell for _, stage in p.roles()}
        shared = [stage.label for _, stage in mine[0].roles() if stage.key in others]
        own = {stage.key for _, stage in mine[0].roles() if stage.key not in others}
        doomed += [e for e in entries if e.key in own]
        if shared:
            console.print(f"kept, shared with other cells: {'; '.join(shared)}")
    for entry in doomed:
        shutil.rmtree(entry.path, ignore_errors=True)
        console.print(f"removed {entry.stage}/{entry.key}")
    console.print(f"removed {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'}")


@cache.command(name="gc")
@click.option("--keep", "keep_matrices", multiple=True, type=click.Path(dir_okay=False),
              help="Keep only the entries these matrices use (repeatable); without it only "
                   "abandoned temporary folders are removed.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@_data_dir
def cache_gc(keep_matrices, dry_run, data_dir) -> None:
    """Remove abandoned temporary folders, and entries no listed matrix needs (a folder whose
    writer is alive is never touched)."""
    from sparselab.cache import StageCache
    keep = None
    if keep_matrices:
        keep = {stage.key for matrix in keep_matrices
                for p in prepare_plans(matrix, None, (), data_dir)[1] for _, stage in p.roles()}
    from sparselab.stages import kinds
    store = StageCache()
    doomed = store.gc(keep, kinds={kind.name for kind in kinds()}, dry_run=dry_run)
    for folder in doomed:
        console.print(f"{'would remove' if dry_run else 'removed'} {folder.relative_to(store.root)}")
    console.print(f"{'would remove' if dry_run else 'removed'} {len(doomed)} folder(s)")


def _pairs(items, option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{option} '{item}' is not KEY=VALUE.")
        out[key.strip()] = value.strip()
    return out


@main.command()
@click.argument("matrix", required=False, type=click.Path(dir_okay=False))
@click.option("--experiment", help="Report an MLflow experiment by name instead of a matrix file.")
@click.option("--run", "parent_run", help="Only the cells of this parent run (one invocation).")
@click.option("--all", "all_runs", is_flag=True, help="Every run of every cell, not just the newest.")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "html", "json"]),
              default="table", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="Write to this file.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Also draw grouped bars with error bars into this PNG (and, when the report has "
                   "speed metrics, accuracy against speed-up into <name>_pareto.png).")
@click.option("--where", multiple=True, metavar="KEY=VALUE", help="Keep cells whose config matches.")
@click.option("--metrics", help="Comma-separated metric columns (default: the matrix's report.metrics).")
@click.option("--pivot", "pivot_spec", help="rows=KEY cols=KEY value=METRIC (space-separated).")
@click.option("--baseline", "baseline_cell", help="Compare against this cell instead of report.baseline.")
@click.option("--unpaired", is_flag=True,
              help="Judge by the standard errors alone, as for runs without per-example scores "
                   "(to see what pairing adds).")
@click.option("--only", help="Comma-separated cell or experiment names to show (the baseline "
                             "stays: their Δ is against it).")
@click.option("--masks", is_flag=True,
              help="Also the agreement of the masks of each replicated cell's pruned models "
                   "across its seeds (read from this machine's stage cache).")
def report(matrix, experiment, parent_run, all_runs, fmt, output, plot_file, where, metrics,
           pivot_spec, baseline_cell, unpaired, only, masks) -> None:
    """Pivot the matrix's MLflow runs into a comparison table (read from the tracking store)."""
    from sparselab import report as rep
    from sparselab.matrix import DENSE, ReportSpec, expand, load_matrix
    from sparselab.tracking import RENAMED_METRICS
    if not matrix and not experiment:
        raise UserError("give a MATRIX file or --experiment NAME.")
    cells = expect = None
    baseline = None
    spec = ReportSpec()
    chosen: list[str] = []
    explicit = False
    if matrix:
        mf = load_matrix(matrix)
        experiment = mf.matrix.name
        cells = [DENSE] + [c.name for c in expand(mf)]
        expect = mf.matrix.expect
        baseline = mf.matrix.report.baseline
        spec = mf.matrix.report
        chosen = list(mf.matrix.report.metrics)
        explicit = "metrics" in mf.matrix.report.model_fields_set
    if only:
        wanted = {name.strip() for name in only.split(",") if name.strip()}
        named = [(DENSE, None)] + [(c.name, c.experiment) for c in expand(mf)] if matrix else None
        known = {n for pair in named for n in pair if n} if named else None
        unknown = sorted(wanted - known) if known else []
        if unknown:
            raise UserError("--only: " + unknown_name("cell", unknown[0], known))
        keep = {n for n, e in named if n in wanted or e in wanted} if named else wanted
        if baseline_cell or baseline:
            keep.add(baseline_cell or baseline)
        cells = [c for c in cells if c in keep] if cells is not None else sorted(keep)
        expect = {c: e for c, e in (expect or {}).items() if c in keep} or None
    if expect:  # metric names renamed since the matrix was written read as today's
        expect = {cell: {RENAMED_METRICS.get(m, m): d for m, d in wanted.items()}
                  for cell, wanted in expect.items()}
    if baseline_cell and baseline_cell != baseline:
        baseline, expect = baseline_cell, None  # the hypotheses are stated against report.baseline
    client = rep._client()
    found = client.get_experiment_by_name(experiment)
    if found is not None:  # runs of a dead process show as killed, not as running forever
        from sparselab.tracking import reconcile
        reconcile(client, found.experiment_id)
    rows = rep.collect(client, experiment, cells, parent_run, all_runs)
    if not any(r.run_id for r in rows):
        raise UserError(f"no runs of '{experiment}' in the tracking store; run it first: "
                        f"sparselab run {matrix or 'MATRIX'}")
    available = sorted({m for r in rows for m in r.metrics if not m.endswith("_stderr")})
    if metrics:
        chosen, explicit = [m.strip() for m in metrics.split(",") if m.strip()], True
    chosen = [RENAMED_METRICS.get(m, m) for m in chosen]
    if not explicit:  # the default columns: those this store has
        chosen = [m for m in (chosen or ReportSpec().metrics) if m in available]
    if not unpaired:
        rep.load_examples(client, rows)
    result = rep.build(rows, experiment, chosen, baseline, expect, _pairs(where, "--where"), spec)
    result.unpaired_requested = unpaired
    if masks:
        from sparselab.cache import StageCache
        rep.load_masks(result, StageCache())
    if pivot_spec:
        spec = _pairs(pivot_spec.split(), "--pivot")
        if set(spec) != {"rows", "cols", "value"}:
            raise UserError("--pivot takes 'rows=KEY cols=KEY value=METRIC'.")
        header, body = rep.pivot(result, spec["rows"], spec["cols"], spec["value"])
        text = "\n".join(",".join(line) for line in [header, *body]) + "\n" if fmt == "csv" else \
            "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(line) + " |" for line in body]) + "\n"
    else:
        renderers = {"md": rep.to_markdown, "csv": rep.to_csv, "html": rep.to_html,
                     "json": rep.to_json}
        text = renderers[fmt](result) if fmt in renderers else None
    if output:
        Path(output).write_text(text if text is not None else rep.to_markdown(result))
        console.print(f"wrote {output}")
    elif text is not None:
        click.echo(text, nl=False)
    else:
        console.print(rep.to_rich(result))
    plots = []
    if plot_file:
        rep.plot(result, Path(plot_file))
        plots.append(Path(plot_file))
        pareto = Path(plot_file).with_name(Path(plot_file).stem + "_pareto.png")
        if rep.plot_pareto(result, pareto):  # speed metrics in the report: accuracy vs speed
            plots.append(pareto)
        console.print("wrote " + ", ".join(map(str, plots)))
    _log_report(client, experiment, parent_run, result, plots)


def _log_report(client, experiment: str, parent_run: str | None, result,
                plots: list[Path]) -> None:
    """The Markdown (and plots) also go on the parent run they describe."""
    import tempfile

    from sparselab import report as rep
    if parent_run is None:
        exp = client.get_experiment_by_name(experiment)
        parents = client.search_runs([exp.experiment_id],
                                     filter_string="tags.`sparselab.invocation` != ''",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            return
        parent_run = parents[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "report.md"
        file.write_text(rep.to_markdown(result))
        client.log_artifact(parent_run, str(file), "report")
        for plot_file in plots:
            client.log_artifact(parent_run, str(plot_file), "report")
