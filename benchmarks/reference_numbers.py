"""Golden rows: sparselab's numbers against independent references on SmolLM2-135M, real data.

    python benchmarks/reference_numbers.py --data-dir ../shared/data             # all checks
    python benchmarks/reference_numbers.py --data-dir ../shared/data --only ppl  # one of them

- `ppl`: dense WikiText-2 perplexity of the whole test split at seqlen 512, computed twice: here
  with plain transformers on the text rebuilt the way the hub's `wikitext` builder makes its rows
  (each line keeps its "\\n", blank lines are ""; joined with "\\n\\n"; tokenized by default; one
  window at a time; float64 log-softmax), and by sparselab (`DATASETS`, `perplexity`). The texts
  must be equal, the token counts equal, the perplexities equal to 1e-6 relative.
- `boolq`, `gsm8k`: the task at --limit (200) and seed 0 through sparselab's `evaluate_tasks` and
  through the `lm_eval` command line on the same converted model and the same prepared task folder;
  the scores must be equal.

Each number must also equal the golden value recorded in benchmarks/results/reference_numbers.json
(seeded with the hub text's token count and the command line's BoolQ 0.42 and GSM8K 0.015 at
limit 200; --record adds a run's new numbers there, e.g. the perplexity). Any disagreement or drift is printed and exits
1. The results go to benchmarks/results/reference_numbers*.md with the command that made them.

On 2 CPU cores: ppl ~2 x 10 min, boolq ~2 x 3 min, gsm8k ~2 x 1 h single-threaded on a shared
machine (5-shot generations; 2026-12-03: 3,466 s and 3,413 s).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, header, smollm2_folder  # noqa: E402

GOLDEN = REPO / "benchmarks" / "results" / "reference_numbers.json"
CHECKS = ("ppl", "boolq", "gsm8k")
TASK_METRICS = {"boolq": {"boolq.acc": "acc,none"},
                "gsm8k": {"gsm8k.exact_match": "exact_match,flexible-extract",
                          "gsm8k.exact_match_strict": "exact_match,strict-match"}}


def hub_rows(path: Path) -> list[str]:
    """The rows of the hub's `wikitext` builder for a raw file, written out here on purpose."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            rows.append(line if line.strip() else "")
    return rows


def reference_perplexity(folder: Path, text: str, seqlen: int, max_windows: int | None
                         ) -> tuple[float, int, int]:
    """(ppl, tokens, windows) with plain transformers, one window at a time, in float64."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    windows = min(ids.shape[1] // seqlen, max_windows or ids.shape[1])
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            window = ids[:, w * seqlen:(w + 1) * seqlen]
            logits = model(input_ids=window).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:]).item()
    return math.exp(total / windows), int(ids.shape[1]), windows


def check_ppl(folder: Path, source, data_dir: Path, seqlen: int, max_windows: int | None
              ) -> tuple[dict, list[str]]:
    from sparselab.evaluate.perplexity import perplexity
    from sparselab.models import load_model
    from sparselab.registry import DATASETS
    problems = []
    text = "\n\n".join(hub_rows(data_dir / "wikitext-2" / "wiki.test.raw"))
    ours_text = DATASETS.get("wikitext2")().text(source, "test")
    if ours_text != text:
        problems.append("sparselab's WikiText-2 test text differs from the hub-shaped rows")
    start = time.perf_counter()
    ref_ppl, tokens, windows = reference_perplexity(folder, text, seqlen, max_windows)
    ref_s = time.perf_counter() - start
    loaded = load_model(folder)
    start = time.perf_counter()
    ours = perplexity(loaded.model, loaded.tokenizer, ours_text, seqlen, batch_size=4,
                      max_windows=max_windows)
    ours_s = time.perf_counter() - start
    if int(ours["windows"]) != windows:
        problems.append(f"windows: sparselab {int(ours['windows'])}, reference {windows}")
    if not math.isclose(ours["ppl"], ref_ppl, rel_tol=1e-6):
        problems.append(f"wikitext2.ppl: sparselab {ours['ppl']:.9f}, reference {ref_ppl:.9f}")
    row = {"wikitext2.ppl": ours["ppl"], "reference": ref_ppl, "tokens": tokens,
           "windows": windows, "seconds": {"sparselab": round(ours_s, 1),
                                           "reference": round(ref_s, 1)}}
    return row, problems


def check_task(task: str, folder: Path, source, limit: int, batch_size: int,
               scratch: Path) -> tuple[dict, list[str]]:
    from sparselab.evaluate.harness import evaluate_tasks, prepare_tasks
    from sparselab.matrix import CellConfig
    from sparselab.models import load_model
    cell = CellConfig(model=str(folder), seed=0, data_dir=str(source.path),
                      evaluate={"tasks": [task], "limit": limit, "batch_size": batch_size,
                                "perplexity": None})
    start = time.perf_counter()
    ours = evaluate_tasks(load_model(folder), cell.evaluate, source, scratch / "ours")
    ours_s = time.perf_counter() - start
    include = prepare_tasks([task], source, scratch / "prepared")
    out = scratch / "cli"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={folder},dtype=float32", "--device", "cpu",
               "--tasks", task, "--include_path", str(include), "--limit", str(limit),
               "--batch_size", str(batch_size), "--seed", "0", "--output_path", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                         os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    cli_s = time.perf_counter() - start
    if done.returncode != 0:
        return {}, [f"lm_eval command line failed on {task}: {done.stderr[-2000:]}"]
    cli = json.loads(Path(glob.glob(str(out / "*" / "results_*.json"))[0]).read_text())
    problems, row = [], {"seconds": {"sparselab": round(ours_s, 1), "lm_eval": round(cli_s, 1)}}
    for ours_name, cli_key in TASK_METRICS[task].items():
        theirs = cli["results"][task][cli_key]
        row[ours_name] = ours[ours_name]
        row[f"{ours_name} (lm_eval)"] = theirs
        if ours[ours_name] != theirs:
            problems.append(f"{ours_name}: sparselab {ours[ours_name]}, lm_eval {theirs}")
    return row, problems


def drift(check: str, row: dict, golden: dict) -> list[str]:
    """Each recorded number against this run's (perplexity to 1e-6 relative, counts exactly);
    a run on other settings (a smaller --limit, --max-windows) has nothing to compare."""
    recorded = golden.get(check, {})
    if any(recorded.get(k, row.get(k)) != row.get(k) for k in ("limit", "windows")):
        print(f"{check}: other settings than the golden row's, not compared", flush=True)
        return []
    problems = []
    for name, expected in recorded.items():
        if name == "seconds" or name not in row:
            continue
        got = row[name]
        same = (math.isclose(got, expected, rel_tol=1e-6) if isinstance(expected, float)
                else got == expected)
        if not same:
            problems.append(f"{check}: {name} is {got}, the golden row says {expected}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--only", default=",".join(CHECKS), help="comma list of " + ", ".join(CHECKS))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="perplexity on the first windows only (a quick check)")
    parser.add_argument("--record", action="store_true",
                        help="add this run's new numbers to the golden rows (when all agree); "
                             "recorded ones are compared, not replaced: edit the file to change one")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/"
                        "reference_numbers.md, or reference_numbers_<checks>.md for --only")
    args = parser.parse_args(argv)
    from sparselab.data.catalog import resolve_data_dir
    source = resolve_data_dir(args.data_dir)
    folder = smollm2_folder()
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    checks = [c for c in args.only.split(",") if c]
    rows, problems = {}, []
    with tempfile.TemporaryDirectory(prefix="sparselab-reference-") as scratch:
        for check in checks:
            if check == "ppl":
                row, found = check_ppl(folder, source, source.path, args.seqlen,
                                       args.max_windows)
            elif check in TASK_METRICS:
                row, found = check_task(check, folder, source, args.limit, args.batch_size,
                                        Path(scratch) / check)
                row["limit"] = args.limit
            else:
                parser.error(f"unknown check '{check}'; valid: {', '.join(CHECKS)}")
            found += drift(check, row, golden)
            print(json.dumps({check: row}), flush=True)
            rows[check], problems = row, problems + found
    if args.record and not problems:  # add what is new; recorded numbers stay as they are
        merged = {check: {**row, **golden.get(check, {})} for check, row in rows.items()}
        for row in merged.values():
            row.pop("seconds", None)
        GOLDEN.write_text(json.dumps({**golden, **merged}, indent=2) + "\n")
    lines = header("Golden rows: sparselab against independent references (SmolLM2-135M)")
    lines += ["| check | number | sparselab | reference | seconds (sparselab / reference) |",
              "| --- | --- | ---: | ---: | --- |"]
    for check, row in rows.items():
        seconds = " / ".join(str(s) for s in row["seconds"].values())
        if check == "ppl":
            lines.append(f"| ppl | wikitext2.ppl ({row['windows']} windows, {row['tokens']} "
                         f"tokens) | {row['wikitext2.ppl']:.6f} | {row['reference']:.6f} "
                         f"(plain transformers, float64) | {seconds} |")
        for name in TASK_METRICS.get(check, {}):
            lines.append(f"| {check} (limit {row['limit']}) | {name} | {row[name]:.4f} | "
                         f"{row[name + ' (lm_eval)']:.4f} (`lm_eval` command line) | {seconds} |")
    lines += ["", "Verdict: " + ("all equal" if not problems else "; ".join(problems)), ""]
    suffix = "" if set(checks) == set(CHECKS) else "_" + "_".join(checks)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"reference_numbers{suffix}.md")
    out.write_text("\n".join(lines), encoding="utf-8")
    for problem in problems:
        print("DRIFT:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
