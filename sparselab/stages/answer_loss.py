"""answer_loss: mean loss on the gold answers of task datasets (sparselab.evaluate.answer_loss)."""
from __future__ import annotations

import json

from sparselab.matrix import AnswerLoss, CellConfig, DataRef, sample_indices
from sparselab.registry import DATASETS
from sparselab.stages.base import StageContext, StageKind


class AnswerLossStage(StageKind):
    # 2: the answer text and its eos scored apart; 3: per-example scores; 4: float64 loss
    name = "answer_loss"
    version = 4
    onloads = True
    memory_hint = "lower evaluate.answer_loss.batch_size or seqlen, or run with --onload"

    def section_of(self, cell: CellConfig) -> AnswerLoss | None:
        return cell.evaluate.answer_loss

    def data_refs(self, section: AnswerLoss) -> list[DataRef]:
        return list(section.data)

    def label(self, section: AnswerLoss) -> str:
        return f"answer loss {','.join(section.data)} limit={section.limit}"

    def memory(self, section: AnswerLoss, m):
        """At most: batches padded to `seqlen` (most are shorter)."""
        from sparselab.footprint import scoring_need
        return scoring_need(m, section.batch_size, section.seqlen)

    def compute(self, section: AnswerLoss, parent, ctx: StageContext) -> None:
        from sparselab.evaluate.answer_loss import example_losses, summarise
        from sparselab.evaluate.examples import ExampleScores, example_id, fingerprint
        from sparselab.onload import streamed
        metrics = {}
        scores = ExampleScores()
        for name in section.data:
            dataset = DATASETS.get(name)()
            split = dataset.examples(ctx.source, dataset.eval_split)
            indices = sample_indices(len(split), section.limit, section.sample, section.seed)
            examples = [split[i] for i in indices]
            with streamed(parent.model):
                losses, tokens = example_losses(parent.model, parent.tokenizer, examples,
                                                section.seqlen, section.batch_size)
            metrics.update({f"{name}.{key}": value
                            for key, value in summarise(losses, tokens).items()})
            scored = fingerprint(json.dumps(examples).encode())
            for score, values in losses.items():  # keyed by the example's index in the split
                scores.add(f"{name}.{score}_nll",
                           (example_id(name, "example", indices[i]) for i in values),
                           values.values(), fingerprint=scored)
        scores.write(ctx.artifacts)
        ctx.write_metrics(metrics)
