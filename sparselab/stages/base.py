"""What a stage kind is: one typed unit with its name, version, section, label and computation.

A cell's plan is a chain of stages (sparselab.stages.plan_cell). Each stage is an instance of a
kind applied to the kind's section of the cell's config; its key hashes the kind's name and
version, the parent's key, the section (`key_config`) and where its data comes from
(`data_refs`), so cells that agree up to a stage share it. `compute` receives the typed
section, the parent's model and a small `StageContext`, never the whole cell.
"""
from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from sparselab.data.catalog import DataSource
from sparselab.matrix import CellConfig, DataRef, data_components
from sparselab.provenance import StageCode

if TYPE_CHECKING:
    from sparselab.cache import Entry, StageCache
    from sparselab.footprint import MemoryContext, Need
    from sparselab.models import LoadedModel


class ModelSection(BaseModel):
    """How a cell's models are built and read back: the `load` stage's section."""
    model: str
    dtype: str
    trust_remote_code: bool

    @classmethod
    def of(cls, cell: CellConfig) -> ModelSection:
        return cls(model=cell.model, dtype=cell.dtype, trust_remote_code=cell.trust_remote_code)


@dataclass(frozen=True)
class StageContext:
    """What a computation may know beyond its section: where its data and entry are, how the
    cell's models are read, and which stage its input came from."""
    source: DataSource
    out: Path  # the entry being written: metrics.json, artifacts/, model/
    models: ModelSection
    parent: Stage | None = None
    parent_folder: Path | None = None  # the parent's cache entry, where it has one
    keyed: dict[str, Any] | None = None  # the stage's key_config, as its key hashed it
    # the model of an earlier stage of the lineage (reconstruction's dense reference), read
    # beside the one in hand; None outside a runner
    read_model: Callable[[Stage], LoadedModel] | None = None

    @property
    def artifacts(self) -> Path:
        return self.out / "artifacts"

    def write_metrics(self, metrics: dict[str, float]) -> None:
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    @property
    def dense_stage(self) -> Stage | None:
        """The lineage's first stage: the model before any pruning."""
        return self.parent.lineage()[0] if self.parent is not None else None

    def write_tags(self, tags: dict[str, str]) -> None:
        """Facts that are words, not numbers (which kernel ran, on what): tags of the cell's run."""
        (self.out / "tags.json").write_text(json.dumps(tags, indent=2))


class StageKind(abc.ABC):
    """One kind of stage. Subclasses set `name` and `version`; bump `version` when the
    computation or its outputs change, so old cache entries are not reused."""
    name: ClassVar[str]
    version: ClassVar[int]
    produces_model: ClassVar[bool] = False
    # whether `--onload` keeps its weights on the host, one decoder layer on the accelerator
    onloads: ClassVar[bool] = False
    # what to change when the memory plan says the stage does not fit
    memory_hint: ClassVar[str] = "use a device with more memory"

    @property
    def time_metric(self) -> str:
        return f"time.{self.name}_s"

    @abc.abstractmethod
    def section_of(self, cell: CellConfig) -> BaseModel | None:
        """The cell's section for this kind; None: the cell has no such stage."""

    def key_config(self, section: BaseModel) -> dict[str, Any]:
        """The part of the section that enters the stage key (and the entry's meta)."""
        return section.identity() if hasattr(section, "identity") else \
            section.model_dump(mode="json")

    def data_refs(self, section: BaseModel) -> list[DataRef] | None:
        """The datasets the stage reads (their revisions enter the key); None: no data at all,
        the data source does not enter the key either."""
        return []

    def code_roots(self, section: BaseModel) -> list[str]:
        """The modules whose source this stage's computation runs (sparselab.provenance follows
        their imports): the kind's own and the datasets it reads. A kind that dispatches by name
        through a registry adds the module it dispatches to."""
        from sparselab.registry import DATASETS
        names = {name for ref in self.data_refs(section) or [] for name in data_components(ref)}
        return [type(self).__module__, *(DATASETS.module_of(name) for name in sorted(names))]

    @abc.abstractmethod
    def label(self, section: BaseModel) -> str:
        """One line for `sparselab plan` and the progress bar."""

    def onloads_for(self, section: BaseModel) -> bool:
        """Whether this stage, with this section, keeps the weights on the host under --onload
        (else the whole model visits the accelerator for it: sparselab.onload.placed)."""
        return self.onloads

    def memory(self, section: BaseModel, m: MemoryContext) -> Need | None:
        """The stage's predicted peak memory (sparselab.footprint); None: not predicted."""
        return None

    @abc.abstractmethod
    def compute(self, section: BaseModel, parent: LoadedModel | None,
                ctx: StageContext) -> LoadedModel | None:
        """Write metrics.json and artifacts/ into `ctx.out`; a model stage also saves its model
        there and returns it (the next stage need not read it back)."""


class ModelStageKind(StageKind):
    """A stage whose output is a model (load, prune, recover): it modifies the parent's model
    and can read its own output back from its entry."""
    produces_model = True

    def passes_through(self, section: BaseModel) -> bool:
        """True: the model comes out as it went in (`method: none`): no stage, keys follow."""
        return False

    def read(self, section: BaseModel, entry: Path, ctx: StageContext,
             parent: Any) -> LoadedModel:
        """The model this stage stored in `entry`; `parent()` gives the parent's model where
        the stored form needs it (an adapter on its base)."""
        from sparselab.models import load_model
        return load_model(entry / "model", dtype=ctx.models.dtype,
                          trust_remote_code=ctx.models.trust_remote_code)

    @staticmethod
    def sparsity_metrics(loaded: LoadedModel, ctx: StageContext) -> dict[str, float]:
        """The model's sparsity overall (returned) and per layer (a CSV and a plot)."""
        from sparselab.plots import plot_layer_sparsity
        from sparselab.prune.layers import sparsity_report
        per_layer, overall = sparsity_report(loaded.model)
        rows = ["layer,zeros,total,sparsity,emptied_inputs"] + [
            f"{name},{s['zeros']},{s['total']},{s['sparsity']:.6f},{s['emptied_inputs']:.6f}"
            for name, s in per_layer.items()]
        (ctx.artifacts / "layer_sparsity.csv").write_text("\n".join(rows) + "\n")
        plot_layer_sparsity(per_layer, ctx.artifacts / "layer_sparsity.png")
        return overall


@dataclass(frozen=True)
class Stage:
    kind: StageKind
    key: str
    section: BaseModel
    config: dict[str, Any]  # what the key hashes: recorded in the entry's meta
    parent: Stage | None
    label: str
    external: bool = False  # a hub id or folder: loaded where it is, nothing stored

    @cached_property
    def code(self) -> StageCode:
        """The code this stage runs, chained with its parent's: what its entry must record."""
        return StageCode.of(self.kind.code_roots(self.section),
                            self.parent.code.lineage if self.parent is not None else None)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for another process (a Ray worker) without `code`: what that process runs
        is its own code, found there."""
        return {k: v for k, v in self.__dict__.items() if k != "code"}

    def entry(self, cache: StageCache, full: bool = False) -> Entry | None:
        """Its cache entry, if one was made by this code (else set aside: to be recomputed)."""
        return cache.entry(self.kind.name, self.key, full, self.code)

    def lineage(self) -> list[Stage]:
        chain = [self]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        return chain[::-1]
