"""tasks: lm-eval tasks (SQuAD v2, GSM8K, BoolQ, ...) scored on the model object
(sparselab.evaluate.harness)."""
from __future__ import annotations

from sparselab.matrix import CellConfig, TaskSettings
from sparselab.stages.base import StageContext, StageKind


class TasksStage(StageKind):
    # 2: per-example scores kept; 3: SQuAD v2 under lm-eval's rules plus the abstention variant
    name = "tasks"
    version = 3

    def section_of(self, cell: CellConfig) -> TaskSettings | None:
        if not cell.evaluate.tasks:
            return None
        return TaskSettings.model_validate(
            {name: getattr(cell.evaluate, name) for name in TaskSettings.model_fields})

    def label(self, section: TaskSettings) -> str:
        return f"tasks {','.join(section.tasks)} limit={section.limit}"

    def compute(self, section: TaskSettings, parent, ctx: StageContext) -> None:
        from sparselab.evaluate.harness import evaluate_tasks
        ctx.write_metrics(evaluate_tasks(parent, section, ctx.source, ctx.artifacts))
