"""recover: the named recovery method fine-tunes the parent's model (sparselab.recover)."""
from __future__ import annotations

import json
import logging

from sparselab.matrix import CellConfig, DataRef, Recover, describe_data
from sparselab.registry import RECOVERY
from sparselab.stages.base import ModelStageKind, StageContext

log = logging.getLogger("sparselab")


class RecoverStage(ModelStageKind):
    # 2: the LoRA initialisation is seeded
    name = "recover"
    version = 2
    memory_hint = ("set recover.train.gradient_checkpointing: true, lower "
                   "recover.train.batch_size (raise grad_accum to keep the batch) or seqlen, or "
                   "train in bf16; dense recovery holds AdamW's two moments of every weight "
                   "(recover.train.optimizer: adafactor holds almost none)")

    def section_of(self, cell: CellConfig) -> Recover:
        return cell.recover

    def passes_through(self, section: Recover) -> bool:
        return RECOVERY.get(section.method).passes_through

    def data_refs(self, section: Recover) -> list[DataRef]:
        return [section.data]

    def code_roots(self, section: Recover) -> list[str]:
        return [*super().code_roots(section), RECOVERY.module_of(section.method)]

    def label(self, section: Recover) -> str:
        return f"recover {section.method} on {describe_data(section.data)}"

    def onloads_for(self, section: Recover) -> bool:
        return RECOVERY.get(section.method).onloads

    def memory(self, section: Recover, m):
        return RECOVERY.get(section.method)().memory(section, m)

    def compute(self, section: Recover, parent, ctx: StageContext):
        from sparselab.recover.base import RecoverContext
        method = RECOVERY.get(section.method)()
        dense = ctx.dense_stage
        method_ctx = RecoverContext(section, ctx.source, ctx.artifacts, log, dense=None
                                    if ctx.read_model is None or dense is None
                                    else lambda: ctx.read_model(dense))
        if ctx.parent_folder is not None:
            # an adapter records its base by this name: the (pruned) model it was trained on,
            # not the folder the dense weights were first read from
            base = str((ctx.parent_folder / "model").resolve())
            parent.model.name_or_path = parent.model.config._name_or_path = base
        recovered, extra = method.recover(parent, method_ctx)
        method.save(recovered, ctx.out)
        (ctx.out / "steps.json").write_text(json.dumps(method_ctx.step_metrics))
        ctx.write_metrics({**self.sparsity_metrics(recovered, ctx), **extra})
        return recovered

    def read(self, section: Recover, entry, ctx: StageContext, parent):
        return RECOVERY.get(section.method)().load(parent, entry, ctx.models.dtype)
