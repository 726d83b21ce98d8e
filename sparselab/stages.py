"""The stage chain of a cell and the keys that let cells share work.

    load -> prune -> perplexity(pruned) -> recover -> perplexity, answer_loss, tasks

Each stage's key hashes its parent's key, its own config and where its data comes from, so cells
that agree up to a stage share that stage (baseline, exp1 and exp3 of the guide prune once).
`method: none` stages are left out: the model passes through and the keys follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparselab.cache import StageCache
from sparselab.data.catalog import DataSource
from sparselab.matrix import Cell, config_hash, data_components
from sparselab.models import model_source
from sparselab.registry import DATASETS, PRUNING

# Bump a stage's version when its computation or its outputs change, so old cache entries are
# not reused (answer_loss 2: the answer text and its eos scored apart; the evaluation stages 3/3/2:
# per-example scores kept for paired comparisons; perplexity 4: float64 loss, the tokenizer's own
# special tokens; answer_loss 4: float64 loss; tasks 3: SQuAD v2 under lm-eval's rules plus the
# abstention-aware variant).
# A change in the text a dataset gives bumps that dataset's `revision` instead (see `_data_key`).
STAGE_VERSIONS = {"load": 1, "prune": 1, "recover": 2, "perplexity": 4, "answer_loss": 4,
                  "tasks": 3}
MODEL_STAGES = ("load", "prune", "recover")


@dataclass(frozen=True)
class Stage:
    kind: str
    key: str
    config: dict[str, Any]
    parent: Stage | None
    label: str
    external: bool = False  # a hub id or folder: loaded where it is, nothing stored

    def lineage(self) -> list[Stage]:
        chain = [self]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        return chain[::-1]


def _data_key(source: DataSource, *refs: Any) -> str:
    """Where a stage's data comes from, plus `name@revision` for each dataset it reads that was
    revised (a stage reading only unrevised datasets keeps its key: SQuAD-calibrated prunes stay
    cached when WikiText-2's text changes)."""
    names = sorted({name for ref in refs for name in data_components(ref)})
    revised = [f"{name}@{DATASETS.get(name).revision}" for name in names
               if DATASETS.get(name).revision != 1]
    return " ".join([source.label, *revised])


def _stage(kind: str, config: dict[str, Any], parent: Stage | None, data: str | None,
           label: str, external: bool = False) -> Stage:
    key = config_hash({"kind": kind, "version": STAGE_VERSIONS[kind],
                       "parent": parent.key if parent else None, "config": config, "data": data})
    return Stage(kind, key, config, parent, label, external)


@dataclass(frozen=True)
class CellPlan:
    """A cell's stages, by the role each plays in its run."""
    cell: Cell
    source: DataSource
    model: Stage
    ppl_pruned: Stage | None
    ppl: Stage | None
    tasks: Stage | None
    answer_loss: Stage | None = None

    def roles(self) -> list[tuple[str, Stage]]:
        """Every stage this cell needs, in order, with the role it plays."""
        out = []
        for stage in self.model.lineage():
            out.append((stage.kind, stage))
            if stage.kind == "prune" and self.ppl_pruned is not None:
                out.append(("perplexity_pruned", self.ppl_pruned))  # while it is in memory
        out += [(role, stage) for role, stage in (("perplexity", self.ppl),
                                                  ("answer_loss", self.answer_loss),
                                                  ("tasks", self.tasks)) if stage is not None]
        return out


def plan_cell(cell: Cell, source: DataSource) -> CellPlan:
    cfg = cell.config
    src = model_source(cfg.model)
    model = _stage("load", {**src.identity(), "dtype": cfg.dtype,
                            "trust_remote_code": cfg.trust_remote_code},
                   None, None, f"load {cfg.model} ({cfg.dtype})", external=not src.needs_build)
    pruned = None
    if cfg.prune.method != "none":
        prune = cfg.prune.model_dump(mode="json")
        if not PRUNING.get(cfg.prune.method).needs_calibration:
            prune.pop("calibration")  # cells that differ only there share the pruned model
        calibration = [cfg.prune.calibration.data] if "calibration" in prune else []
        model = pruned = _stage("prune", prune, model, _data_key(source, *calibration),
                                f"prune {cfg.prune.method} {cfg.prune.sparsity:g} "
                                f"{cfg.prune.pattern}"
                                + (f" calib={_data(prune['calibration']['data'])}"
                                   if "calibration" in prune else ""))
    if cfg.recover.method != "none":
        recover = cfg.recover.model_dump(mode="json")
        model = _stage("recover", recover, model, _data_key(source, cfg.recover.data),
                       f"recover {cfg.recover.method} on {_data(recover['data'])}")
    ev = cfg.evaluate
    ppl = ppl_pruned = tasks = None
    if ev.perplexity is not None:
        ppl_cfg = ev.perplexity.model_dump(mode="json")
        label = f"perplexity {ev.perplexity.data} seqlen={ev.perplexity.seqlen}"
        data = _data_key(source, ev.perplexity.data)
        ppl = _stage("perplexity", ppl_cfg, model, data, label)
        if pruned is not None:
            ppl_pruned = _stage("perplexity", ppl_cfg, pruned, data, label + " (pruned)")
    answer = None
    if ev.answer_loss is not None:
        answer = _stage("answer_loss", ev.answer_loss.model_dump(mode="json"), model,
                        _data_key(source, *ev.answer_loss.data), f"answer loss {','.join(ev.answer_loss.data)} "
                                      f"limit={ev.answer_loss.limit}")
    if ev.tasks:
        tasks_cfg = ev.model_dump(mode="json", exclude={"perplexity", "answer_loss"})
        tasks = _stage("tasks", tasks_cfg, model, source.label,
                       f"tasks {','.join(ev.tasks)} limit={ev.limit}")
    return CellPlan(cell, source, model, ppl_pruned, ppl, tasks, answer)


def _data(ref: Any) -> str:
    if isinstance(ref, str):
        return ref
    return "+".join(f"{k}:{v:g}" for k, v in ref["mix"].items())


def stage_status(stage: Stage, cache: StageCache) -> str:
    if stage.external:
        return "external"
    return "cached" if cache.entry(stage.kind, stage.key) else "to run"
