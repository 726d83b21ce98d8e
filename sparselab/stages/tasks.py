"""tasks: lm-eval tasks (SQuAD v2, GSM8K, BoolQ, ...) scored on the model object
(sparselab.evaluate.harness)."""
from __future__ import annotations

from sparselab.matrix import CellConfig, TaskSettings
from sparselab.stages.base import StageContext, StageKind


class TasksStage(StageKind):
    # 2: per-example scores kept; 3: SQuAD v2 under lm-eval's rules plus the abstention variant
    name = "tasks"
    version = 3
    onloads = True
    memory_hint = "lower evaluate.batch_size, or run with --onload"

    def section_of(self, cell: CellConfig) -> TaskSettings | None:
        if not cell.evaluate.tasks:
            return None
        return TaskSettings.model_validate(
            {name: getattr(cell.evaluate, name) for name in TaskSettings.model_fields})

    def code_roots(self, section: TaskSettings) -> list[str]:
        from sparselab.registry import DATASETS, TASKS
        datasets = {TASKS.get(task).dataset for task in section.tasks} - {None}
        return [*super().code_roots(section), *(TASKS.module_of(task) for task in section.tasks),
                *(DATASETS.module_of(name) for name in sorted(datasets))]

    def label(self, section: TaskSettings) -> str:
        return f"tasks {','.join(section.tasks)} limit={section.limit}"

    def memory(self, section: TaskSettings, m):
        """lm-eval's batches: for log-likelihoods, the logits and their log-softmax in the
        model's dtype; for generation, the KV cache; prompts assumed up to `TASK_CONTEXT`
        tokens (the data decides: the plan cannot read it)."""
        from sparselab.footprint import TASK_CONTEXT, Need
        s, batch = m.shape, section.batch_size
        scoring = 2 * batch * TASK_CONTEXT * s.vocab * m.bytes
        kv_cache = (batch * (TASK_CONTEXT + 256) * s.layers * 2 * s.kv_heads * s.head_dim
                    * m.bytes)
        return Need.of({"weights": m.resident_weights,
                        f"logits of {TASK_CONTEXT}-token prompts": max(scoring, kv_cache)},
                       m.weights if m.onload else 0)

    def compute(self, section: TaskSettings, parent, ctx: StageContext) -> None:
        from sparselab.evaluate.harness import evaluate_tasks
        from sparselab.onload import streamed
        with streamed(parent.model):
            ctx.write_metrics(evaluate_tasks(parent, section, ctx.source, ctx.artifacts))
