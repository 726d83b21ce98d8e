"""Is a study's BoolQ accuracy reading comprehension or a leaning towards one answer?

lm-eval scores BoolQ by whether " yes" or " no" is the likelier continuation. A model that leans
to one of them scores that answer's share of the examples whatever it understood. This reads the
per-example log-likelihoods lm-eval logged in each cell's cached `tasks` stage (nothing is run)
and prints how often each cell answers yes beside its accuracy (checked against the logged
boolq.acc) and the always-yes accuracy.

    python benchmarks/boolq_bias.py matrix/task_specific.yaml --data-dir ../shared/data

Writes benchmarks/results/boolq_bias_<study>.md.
"""
from __future__ import annotations

import argparse
import json

from common import REPO, header


def main() -> None:
    from sparselab.cache import StageCache
    from sparselab.study import prepare_plans

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()

    mf, plans = prepare_plans(args.matrix, None, (), args.data_dir)
    cache = StageCache()
    lines = header(f"BoolQ answers: yes-rate against accuracy, {mf.matrix.name}")
    lines += ["| cell | examples | answers yes | accuracy | always-yes accuracy |",
              "|---|---|---|---|---|"]
    for plan in plans:
        tasks = plan.stage("tasks")
        entry = cache.entry("tasks", tasks.key) if tasks else None
        samples = entry.path / "artifacts" / "lm_eval_samples_boolq.jsonl" if entry else None
        if samples is None or not samples.is_file():
            raise SystemExit(f"{plan.cell.name}: no cached BoolQ samples; run the study first")
        rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        # choices are (" no", " yes"); each response is [log-likelihood, is-greedy]
        says_yes = [float(r["filtered_resps"][1][0]) > float(r["filtered_resps"][0][0])
                    for r in rows]
        gold_yes = [int(r["target"]) == 1 for r in rows]  # logged as a string
        correct = [s == g for s, g in zip(says_yes, gold_yes)]
        n = len(rows)
        if abs(sum(correct) / n - entry.metrics["boolq.acc"]) > 1e-9:
            raise SystemExit(f"{plan.cell.name}: accuracy differs from the logged boolq.acc")
        lines.append(f"| {plan.cell.name} | {n} | {sum(says_yes) / n:.2f} | "
                     f"{sum(correct) / n:.2f} | {sum(gold_yes) / n:.2f} |")
    lines.append("")
    out = REPO / "benchmarks" / "results" / f"boolq_bias_{mf.matrix.name}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
