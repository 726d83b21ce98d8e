"""How much of a study's answer loss is the answer and how much is the closing eos.

`<task>.answer_nll` scores the gold answer plus the eos that ends it. A model fine-tuned on short
task answers learns to stop; one fine-tuned on running text does not, and for BoolQ (" yes" +
eos) the eos is half the score. This loads each cell's evaluated model of a finished study from
the stage cache (nothing is retrained) and splits the loss into `answer_text_nll` and
`answer_eos_nll` (see `sparselab.evaluate.answer_loss`).

    python benchmarks/answer_tokens_smollm2.py matrix/task_specific.yaml --data boolq \
        --data-dir ../shared/data

Writes benchmarks/results/answer_tokens_<study>_<data>.md.
"""
from __future__ import annotations

import argparse
import time

from common import REPO, header

NAMES = ("answer_nll", "answer_text_nll", "answer_eos_nll")


def main() -> None:
    from sparselab.cache import StageCache
    from sparselab.cli import _prepare
    from sparselab.evaluate.answer_loss import answer_loss
    from sparselab.registry import DATASETS
    from sparselab.runner import StageRunner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix")
    parser.add_argument("--data", nargs="+", default=["boolq"], help="answer-loss datasets")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()

    mf, plans = _prepare(args.matrix, None, (), args.data_dir)
    cache = StageCache()
    lines = header(f"Answer loss split into answer text and eos: {mf.matrix.name}")
    lines += ["Each cell's evaluated model read from the stage cache; the cell's `answer_loss` "
              "settings (limit, seqlen); mean ± stderr over examples of the mean loss per token. "
              "`answer_nll` must equal what the study logged (checked).", ""]
    for name in args.data:
        dataset = DATASETS.get(name)()
        lines += [f"## {name}", "", "| cell | " + " | ".join(f"{name}.{n}" for n in NAMES)
                  + " | s |", "|---" * (len(NAMES) + 2) + "|"]
        for plan in plans:
            cfg = plan.cell.config.evaluate.answer_loss
            entry = cache.entry("answer_loss", plan.answer_loss.key)
            if entry is None:
                raise SystemExit(f"{plan.cell.name}: run the study first (answer loss not cached)")
            loaded = StageRunner(cache).model(plan.model, plan)
            examples = dataset.examples(plan.source, dataset.eval_split)[:cfg.limit]
            start = time.perf_counter()
            result = answer_loss(loaded.model, loaded.tokenizer, examples, cfg.seqlen,
                                 cfg.batch_size)
            seconds = time.perf_counter() - start
            logged = entry.metrics[f"{name}.answer_nll"]
            if abs(result["answer_nll"] - logged) > 1e-3 * max(1.0, abs(logged)):
                raise SystemExit(f"{plan.cell.name}: {result['answer_nll']} != logged {logged}")
            lines.append(f"| {plan.cell.name} | " + " | ".join(
                f"{result[n]:.3f} ± {result[n + '_stderr']:.3f}" for n in NAMES)
                + f" | {seconds:.0f} |")
            print(lines[-1], flush=True)
        lines.append("")
    out = REPO / "benchmarks" / "results" / f"answer_tokens_{mf.matrix.name}_{'_'.join(args.data)}.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
