"""perplexity: WikiText-2-style perplexity of the model on a dataset's evaluation split."""
from __future__ import annotations

from sparselab.matrix import CellConfig, DataRef, Perplexity
from sparselab.registry import DATASETS
from sparselab.stages.base import StageContext, StageKind


class PerplexityStage(StageKind):
    # 4: float64 loss, the tokenizer's own special tokens (3: per-window scores kept)
    name = "perplexity"
    version = 4
    onloads = True
    memory_hint = ("lower evaluate.perplexity.batch_size (its logits are batch x seqlen x "
                   "vocabulary), or run with --onload")

    def section_of(self, cell: CellConfig) -> Perplexity | None:
        return cell.evaluate.perplexity

    def data_refs(self, section: Perplexity) -> list[DataRef]:
        return [section.data]

    def label(self, section: Perplexity) -> str:
        return f"perplexity {section.data} seqlen={section.seqlen}"

    def memory(self, section: Perplexity, m):
        from sparselab.footprint import scoring_need
        return scoring_need(m, section.batch_size, section.seqlen)

    def compute(self, section: Perplexity, parent, ctx: StageContext) -> None:
        from sparselab.evaluate.examples import ExampleScores, example_id, fingerprint
        from sparselab.evaluate.perplexity import summarise, window_losses, windows_of
        from sparselab.onload import streamed
        dataset = DATASETS.get(section.data)()
        text = dataset.text(ctx.source, dataset.eval_split)
        windows = windows_of(parent.tokenizer, text, section.seqlen, section.max_windows)
        with streamed(parent.model):
            nll = window_losses(parent.model, windows, section.batch_size)
        scores = ExampleScores()
        scores.add(f"{section.data}.ppl",
                   (example_id(section.data, "window", i) for i in range(len(nll))),
                   nll, "exp_mean", fingerprint=fingerprint(windows.numpy().tobytes()))
        scores.write(ctx.artifacts)
        result = summarise(nll, section.seqlen)
        metrics = {f"{section.data}.ppl": result["ppl"],
                   f"{section.data}.ppl_tokens": result["tokens"]}
        if "ppl_stderr" in result:  # one window has no spread
            metrics[f"{section.data}.ppl_stderr"] = result["ppl_stderr"]
        ctx.write_metrics(metrics)
