"""Dense SmolLM2-135M: WikiText-2 perplexity and the three harness tasks, with their speed.

    python benchmarks/evaluate_smollm2.py --data-dir ../shared/data --limit 200

Uses the SmolLM2-135M folder of benchmarks/common.py (converted once), then measures WikiText-2
perplexity (seqlen 512, the whole test split unless --max-windows) and
squadv2 / gsm8k / boolq through `sparselab.evaluate.harness.evaluate_tasks` (lm-eval defaults:
gsm8k 5-shot, the others 0-shot), each task timed on its own. Writes a Markdown table with the
command at the top to --out (default benchmarks/results/evaluate_smollm2.md); lm-eval's results
and samples go to --artifacts (outside the repo's tracked files: the samples hold the data).

Speeds measured on 2 CPU cores: BoolQ 0.1-0.4 s/example, GSM8K and SQuAD 1.2-5 s/example, so
--limit 200 takes 30+ minutes; use e.g. --limit 10 --max-windows 8 to check that it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, smollm2_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data",
                        help="folder laid out like ../shared/data ('builtin': the fixtures)")
    parser.add_argument("--limit", type=int, default=200, help="examples per task")
    parser.add_argument("--tasks", default="squadv2,gsm8k,boolq")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="default: lm-eval's per task (gsm8k 5, others 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="perplexity windows (default: the whole test split)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                             "evaluate_smollm2.md"))
    parser.add_argument("--artifacts", default=str(REPO / ".sparselab" / "bench" /
                                                   "evaluate_smollm2"),
                        help="lm-eval results/samples (they hold the data: kept out of the repo)")
    args = parser.parse_args(argv)

    import torch
    import lm_eval
    import transformers

    from sparselab.data.catalog import resolve_data_dir
    from sparselab.evaluate.harness import evaluate_tasks
    from sparselab.evaluate.perplexity import perplexity
    from sparselab.matrix import CellConfig
    from sparselab.models import SmolLM2GGUF, load_model
    from sparselab.registry import DATASETS

    command = "python " + " ".join(shlex.quote(a) for a in [
        os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])])
    source = resolve_data_dir(args.data_dir)
    load_start = os.getloadavg()[0]
    tasks = [t for t in args.tasks.split(",") if t]
    out = Path(args.out)
    artifacts = Path(args.artifacts)
    model_dir = smollm2_folder()
    start = time.perf_counter()
    loaded = load_model(model_dir)
    load_s = time.perf_counter() - start

    rows: list[tuple[str, str, str]] = []
    start = time.perf_counter()
    wikitext = DATASETS.get("wikitext2")()
    text = wikitext.text(source, wikitext.eval_split)
    ppl = perplexity(loaded.model, loaded.tokenizer, text, args.seqlen, batch_size=4,
                     max_windows=args.max_windows)
    ppl_s = time.perf_counter() - start
    print(f"wikitext2.ppl = {ppl['ppl']:.3f} ({int(ppl['windows'])} windows, {ppl_s:.1f}s)",
          flush=True)
    rows.append(("wikitext2.ppl", f"{ppl['ppl']:.3f}",
                 f"{int(ppl['windows'])} windows x {args.seqlen} tokens, {ppl_s:.1f} s"))

    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    all_metrics: dict[str, float] = {}
    for task in tasks:
        cell = CellConfig(model=str(model_dir), seed=args.seed, data_dir=args.data_dir,
                          evaluate={"tasks": [task], "limit": args.limit,
                                    "num_fewshot": args.num_fewshot,
                                    "batch_size": args.batch_size, "perplexity": None})
        start = time.perf_counter()
        metrics = evaluate_tasks(loaded, cell.evaluate, source, artifacts / task)
        timings[task] = time.perf_counter() - start
        examples = counts[task] = (_examples(artifacts / task / "lm_eval_results.json", task)
                                   or args.limit)
        per_example = timings[task] / examples
        print(f"{task}: {json.dumps(metrics)} ({timings[task]:.1f}s, "
              f"{per_example:.2f} s/example)", flush=True)
        all_metrics.update(metrics)
        for name, value in metrics.items():
            if name.endswith("_stderr"):
                continue
            stderr = metrics.get(name + "_stderr")
            shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
            rows.append((name, shown, f"{examples} examples, {per_example:.2f} s/example"))

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Dense SmolLM2-135M: perplexity and harness tasks",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_cpu_name()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} (threads {torch.get_num_threads()}), "
        f"transformers {transformers.__version__}, lm_eval {lm_eval.__version__}",
        f"- model: smollm2-135m ({SmolLM2GGUF.gguf_file} dequantised to float32), "
        f"loaded in {load_s:.1f} s",
        f"- data: {source.label}; limit {args.limit} per task; num_fewshot "
        f"{'lm-eval default' if args.num_fewshot is None else args.num_fewshot}; "
        f"batch size {args.batch_size}; seed {args.seed}",
        f"- load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes on the machine slow every timing down)",
        "- squadv2 scores are percentages (lm-eval's scale), the others fractions; "
        "seconds per example include the task's setup.",
        "",
        "| metric | value | measured on |",
        "| --- | --- | --- |",
        *[f"| {name} | {value} | {note} |" for name, value, note in rows],
        "",
        "| task | examples | seconds | s/example |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {task} | {counts[task]} | {seconds:.1f} | {seconds / counts[task]:.2f} |"
          for task, seconds in timings.items()],
        "",
        f"lm-eval results and per-sample outputs were written to `{artifacts}` (not committed).",
        "",
    ]
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _examples(results_json: Path, task: str) -> int | None:
    try:
        return int(json.loads(results_json.read_text())["n-samples"][task]["effective"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
