"""prune: the named pruning method applied to the parent's model (sparselab.prune)."""
from __future__ import annotations

import logging
from typing import Any

from sparselab.matrix import CellConfig, DataRef, Prune, describe_data
from sparselab.registry import PRUNING
from sparselab.stages.base import ModelStageKind, StageContext

log = logging.getLogger("sparselab")


class PruneStage(ModelStageKind):
    name = "prune"
    version = 1
    onloads = True
    memory_hint = ("run with --onload, or lower prune.calibration.samples or "
                   "prune.calibration.seqlen")

    def section_of(self, cell: CellConfig) -> Prune:
        return cell.prune

    def passes_through(self, section: Prune) -> bool:
        return PRUNING.get(section.method).passes_through

    def key_config(self, section: Prune) -> dict[str, Any]:
        config = section.identity()
        if not PRUNING.get(section.method).needs_calibration:
            config.pop("calibration")  # cells that differ only there share the pruned model
        return config

    def data_refs(self, section: Prune) -> list[DataRef]:
        return [section.calibration.data] if PRUNING.get(section.method).needs_calibration \
            else []

    def code_roots(self, section: Prune) -> list[str]:
        return [*super().code_roots(section), PRUNING.module_of(section.method)]

    def label(self, section: Prune) -> str:
        calibration = f" calib={describe_data(section.calibration.data)}" \
            if PRUNING.get(section.method).needs_calibration else ""
        blocks = section.options.get("blocks") or {}
        grouped = "".join(f" {key}={value}" for key, value in blocks.items())
        return f"prune {section.method} {section.sparsity:g} {section.pattern}{grouped}{calibration}"

    def onloads_for(self, section: Prune) -> bool:
        return PRUNING.get(section.method).onloads

    def memory(self, section: Prune, m):
        return PRUNING.get(section.method)().memory(section, m)

    def compute(self, section: Prune, parent, ctx: StageContext):
        from sparselab.cache import StageCache
        from sparselab.models import save_model
        from sparselab.prune.base import PruneContext
        method = PRUNING.get(section.method)()
        extra = method.prune(parent, PruneContext(section, ctx.source, ctx.artifacts, log,
                                                  model_key=ctx.parent.key,
                                                  model_code=ctx.parent.code.lineage,
                                                  cache=StageCache()))
        metrics = {**self.sparsity_metrics(parent, ctx), **extra}
        save_model(parent, ctx.out / "model")
        ctx.write_metrics(metrics)
        return parent
