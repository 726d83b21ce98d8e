"""load: the cell's model, built (tiny test models, converted GGUF) or read where it is."""
from __future__ import annotations

from typing import Any

from sparselab.matrix import CellConfig
from sparselab.stages.base import ModelSection, ModelStageKind, StageContext


class LoadStage(ModelStageKind):
    name = "load"
    version = 1
    onloads = True
    memory_hint = ("run with --onload (the weights stay on the host, one decoder layer at a "
                   "time on the device), or use dtype bfloat16 if it is float32")

    def section_of(self, cell: CellConfig) -> ModelSection:
        return ModelSection.of(cell)

    def key_config(self, section: ModelSection) -> dict[str, Any]:
        from sparselab.models import model_source
        return {**model_source(section.model).identity(), "dtype": section.dtype,
                "trust_remote_code": section.trust_remote_code}

    def data_refs(self, section: ModelSection) -> None:
        return None

    def code_roots(self, section: ModelSection) -> list[str]:
        from sparselab.registry import MODELS
        return [*super().code_roots(section), "sparselab.models",
                *([MODELS.module_of(section.model)] if section.model in MODELS else [])]

    def label(self, section: ModelSection) -> str:
        return f"load {section.model} ({section.dtype})"

    def memory(self, section: ModelSection, m):
        from sparselab.footprint import Need
        return Need.of({"weights": 0 if m.onload else m.weights}, m.weights)

    def is_external(self, section: ModelSection) -> bool:
        """A hub id or a folder is loaded where it is: nothing is stored."""
        from sparselab.models import model_source
        return not model_source(section.model).needs_build

    def compute(self, section: ModelSection, parent: None, ctx: StageContext):
        from sparselab.models import load_model, model_source
        from sparselab.prune.layers import sparsity_report
        if self.is_external(section):
            loaded = self.read(section, ctx.out, ctx, None)
        else:
            model_source(section.model).build(ctx.out / "model", section.dtype)
            loaded = load_model(ctx.out / "model", dtype=section.dtype)
        ctx.write_metrics(sparsity_report(loaded.model)[1])
        return loaded

    def read(self, section: ModelSection, entry, ctx: StageContext, parent):
        if self.is_external(section):
            from sparselab.models import model_source
            return model_source(section.model).load(section.dtype, section.trust_remote_code)
        return super().read(section, entry, ctx, parent)
