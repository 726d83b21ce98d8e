"""The stage chain of a cell and the keys that let cells share work.

    load -> prune -> perplexity(pruned) -> recover -> perplexity, answer_loss, tasks, ...

Each stage kind is one module here (sparselab.stages.base says what a kind is). A cell's model
passes through `MODEL_CHAIN`; every evaluation kind then scores the final model, and the
perplexity kind the pruned one too. Each stage's key hashes its parent's key, its own section
and where its data comes from, so cells that agree up to a stage share that stage (the dense
reference and every cell that prunes alike prune once). A model stage whose method passes the
model through (`method: none`) is left out: the keys follow. `register_evaluation` adds an
evaluation kind made elsewhere; a matrix then sets its section as `evaluate.<name>`.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from sparselab.cache import StageCache, made_by_other_code
from sparselab.data.catalog import DataSource
from sparselab.matrix import (
    ADDED_EVALUATIONS,
    Cell,
    DataRef,
    config_hash,
    data_components,
)
from sparselab.registry import DATASETS
from sparselab.stages.answer_loss import AnswerLossStage
from sparselab.stages.base import (
    ModelSection,
    ModelStageKind,
    Stage,
    StageContext,
    StageKind,
)
from sparselab.stages.load import LoadStage
from sparselab.stages.perplexity import PerplexityStage
from sparselab.stages.prune import PruneStage
from sparselab.stages.recover import RecoverStage
from sparselab.stages.speed import SpeedStage
from sparselab.stages.tasks import TasksStage

AFFECTS_RESULTS = False  # plans or reports only: sparselab.provenance leaves it out

__all__ = ["CellPlan", "ModelSection", "ModelStageKind", "Stage", "StageContext", "StageKind",
           "STORED", "kind_named", "kinds", "plan_cell", "register_evaluation", "stage_status",
           "unregister_evaluation"]

LOAD, PRUNE, RECOVER = LoadStage(), PruneStage(), RecoverStage()
MODEL_CHAIN: tuple[ModelStageKind, ...] = (LOAD, PRUNE, RECOVER)
PERPLEXITY = PerplexityStage()
_EVALUATIONS: dict[str, StageKind] = {
    kind.name: kind for kind in (PERPLEXITY, AnswerLossStage(), TasksStage(), SpeedStage())}
PRUNED_ROLE = "perplexity_pruned"  # the pruned model's perplexity, before any recovery


def kinds() -> list[StageKind]:
    """Every stage kind, in the order a cell runs them."""
    return [*MODEL_CHAIN, *_EVALUATIONS.values()]


def kind_named(role: str) -> StageKind:
    """The kind of a role in `CellPlan.roles` (a kind's name, or the pruned perplexity)."""
    return PERPLEXITY if role == PRUNED_ROLE else next(k for k in kinds() if k.name == role)


def register_evaluation(kind: StageKind, section: type[BaseModel]) -> None:
    """Add an evaluation stage: `kind.section_of` should read `cell.evaluate.added(kind.name)`,
    whose type `section` the matrix validates at `evaluate.<kind.name>`."""
    if kind.name in _EVALUATIONS or kind.name in {k.name for k in MODEL_CHAIN}:
        raise ValueError(f"a stage kind named '{kind.name}' exists already")
    _EVALUATIONS[kind.name] = kind
    ADDED_EVALUATIONS[kind.name] = section


def unregister_evaluation(name: str) -> None:
    _EVALUATIONS.pop(name)
    ADDED_EVALUATIONS.pop(name)


def _data_key(source: DataSource, refs: list[DataRef]) -> str:
    """Where a stage's data comes from, plus `name@revision` for each dataset it reads that was
    revised (a stage reading only unrevised datasets keeps its key: SQuAD-calibrated prunes stay
    cached when WikiText-2's text changes)."""
    names = sorted({name for ref in refs for name in data_components(ref)})
    revised = [f"{name}@{DATASETS.get(name).revision}" for name in names
               if DATASETS.get(name).revision != 1]
    return " ".join([source.label, *revised])


def _stage(kind: StageKind, section: BaseModel, parent: Stage | None, source: DataSource,
           label_suffix: str = "") -> Stage:
    config = kind.key_config(section)
    refs = kind.data_refs(section)
    key = config_hash({"kind": kind.name, "version": kind.version,
                       "parent": parent.key if parent else None, "config": config,
                       "data": None if refs is None else _data_key(source, refs)})
    external = isinstance(kind, LoadStage) and kind.is_external(section)
    return Stage(kind, key, section, config, parent, kind.label(section) + label_suffix, external)


@dataclass(frozen=True)
class CellPlan:
    """A cell's stages: the chain that makes its final model, and the evaluations of the
    pruned model (before recovery) and of the final one."""
    cell: Cell
    source: DataSource
    model: Stage
    pruned_evaluations: tuple[Stage, ...] = ()
    final_evaluations: tuple[Stage, ...] = ()

    @property
    def models(self) -> ModelSection:
        return ModelSection.of(self.cell.config)

    def roles(self) -> list[tuple[str, Stage]]:
        """Every stage this cell needs, in order, with the role it plays."""
        out = []
        for stage in self.model.lineage():
            out.append((stage.kind.name, stage))
            if stage.kind is PRUNE:  # while the pruned model is in memory
                out += [(PRUNED_ROLE, s) for s in self.pruned_evaluations]
        return out + [(stage.kind.name, stage) for stage in self.final_evaluations]

    def stage(self, role: str) -> Stage | None:
        return dict(self.roles()).get(role)


def plan_cell(cell: Cell, source: DataSource) -> CellPlan:
    model: Stage | None = None
    pruned = None
    for kind in MODEL_CHAIN:
        section = kind.section_of(cell.config)
        if kind.passes_through(section):
            continue
        model = _stage(kind, section, model, source)
        if kind is PRUNE:
            pruned = model
    ppl = PERPLEXITY.section_of(cell.config)
    pruned_evaluations = () if pruned is None or ppl is None else \
        (_stage(PERPLEXITY, ppl, pruned, source, " (pruned)"),)
    final = tuple(_stage(kind, section, model, source) for kind in _EVALUATIONS.values()
                  if (section := kind.section_of(cell.config)) is not None)
    return CellPlan(cell, source, model, pruned_evaluations, final)


STORED = ("cached", "external")  # the statuses of a stage that need not run


def stage_status(stage: Stage, cache: StageCache) -> str:
    """cached | external | to run | made by other code (an entry this code will not serve: a
    run recomputes it). Looks only: nothing is set aside."""
    if stage.external:
        return "external"
    entry = cache.entry(stage.kind.name, stage.key)
    if entry is None:
        return "to run"
    return "cached" if made_by_other_code(entry, stage.code) is None else "made by other code"
