"""Recovery on SmolLM2-135M pruned 50% by Wanda: sparselab's LoRA and dense loops against a plain
peft + transformers.Trainer loop on the same data and settings.

    python benchmarks/recover_smollm2.py --data-dir ../shared/data --steps 40

Each configuration runs in its own process so its peak memory (max RSS) is its own. Reported:
CPU seconds per optimizer step (and the speed ratio to Trainer for the same method), steps/s,
peak memory, trainable parameters, the held-out loss,
WikiText-2 perplexity before/after (seqlen 512, --max-windows), the sparsity check for dense, and
with --task-limit N the SQuAD v2 F1 before/after for sparselab's SQuAD-recovered configurations
(the Trainer rows are the speed reference; their F1 would repeat the same question).
Writes benchmarks/results/recover_smollm2.md; each finished configuration is kept in ROWS, so a
rerun measures only what is missing (delete ROWS to measure again).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, header, smollm2_folder  # noqa: E402


def pruned_folder(data_dir: str) -> Path:
    """SmolLM2-135M pruned 50% unstructured by Wanda (WikiText-2, 32x256), built once."""
    from sparselab.cache import sparselab_home
    from sparselab.data.catalog import resolve_data_dir
    from sparselab.matrix import CellConfig
    from sparselab.models import load_model, save_model
    from sparselab.prune.base import PruneContext
    from sparselab.registry import PRUNING
    folder = sparselab_home() / "benchmarks" / "smollm2-135m-wanda50"
    if not (folder / "config.json").is_file():
        loaded = load_model(smollm2_folder())
        cell = CellConfig.model_validate({"model": "smollm2-135m", "data_dir": data_dir, "prune": {
            "method": "wanda", "sparsity": 0.5, "calibration": {"samples": 32, "seqlen": 256}}})
        PRUNING.get("wanda")().prune(loaded, PruneContext(
            cell.prune, resolve_data_dir(data_dir), Path(tempfile.mkdtemp()), logging.getLogger("bench")))
        save_model(loaded, folder)
    return folder


class StepClock(list):
    """Per-step records that also note the thread's CPU time at the end of every optimizer step
    (sparselab's loop appends one record per step), so both loops are timed step by step."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def append(self, record) -> None:
        self.ends.append(time.thread_time())
        super().append(record)


def median_step_cpu_s(ends: list[float]) -> float:
    """The median CPU seconds between consecutive step ends: robust to bursts of contention."""
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


# Finished configurations (one JSON line each): an interrupted benchmark resumes where it stopped.
ROWS = REPO / ".sparselab" / "bench" / "recover_rows.jsonl"


def worker(spec: dict) -> dict:
    import torch

    from sparselab.data.catalog import resolve_data_dir
    from sparselab.evaluate.perplexity import perplexity
    from sparselab.matrix import CellConfig
    from sparselab.models import load_model
    from sparselab.prune.layers import sparsity_report
    from sparselab.recover.base import RecoverContext
    from sparselab.registry import DATASETS, RECOVERY
    torch.manual_seed(0)
    source = resolve_data_dir(spec["data_dir"])
    loaded = load_model(spec["pruned"])
    wiki = DATASETS.get("wikitext2")()
    text = wiki.text(source, "test")

    def ppl(model):
        return perplexity(model, loaded.tokenizer, text, 512, 4, spec["max_windows"])["ppl"]

    # SQuAD is scored for the pruned model ("before") and after sparselab's SQuAD recoveries
    scored = bool(spec["task_limit"]) and spec["data"] == "squad" and spec["loop"] != "trainer"

    def squad(model) -> dict:
        """SQuAD v2 F1 overall and on the answerable / unanswerable questions (percent)."""
        from sparselab.evaluate.harness import evaluate_tasks
        from sparselab.models import LoadedModel
        cell = CellConfig.model_validate({"model": "smollm2-135m", "data_dir": spec["data_dir"],
                                          "evaluate": {"tasks": ["squadv2"],
                                                       "limit": spec["task_limit"]}})
        metrics = evaluate_tasks(LoadedModel(model, loaded.tokenizer), cell.evaluate, source,
                                 Path(tempfile.mkdtemp()))
        return {m: metrics.get(f"squadv2.{m}") for m in ("f1", "HasAns_f1", "NoAns_f1")}

    if spec["loop"] == "before":  # the pruned model's scores, in a process of their own
        return {"ppl": ppl(loaded.model), "squad": squad(loaded.model) if scored else None}
    result = {k: spec[k] for k in ("loop", "method", "data")}
    method = spec["method"]
    train = {"samples": spec["samples"], "max_steps": spec["steps"], "seqlen": spec["seqlen"],
             "batch_size": spec["batch"], "grad_accum": 1, "lr": 2e-4 if method == "lora" else 2e-5,
             "warmup_steps": 0, "schedule": "linear"}
    cell = CellConfig.model_validate({"model": "smollm2-135m", "data_dir": spec["data_dir"],
                                      "prune": {"method": "wanda"}, "recover": {
                                          "method": method, "data": spec["data"], "train": train}})
    result["load_before"] = os.getloadavg()[0]
    cpu_start = _cpu_seconds()
    if spec["loop"] == "sparselab":
        ctx = RecoverContext(cell.recover, source, Path(tempfile.mkdtemp()), logging.getLogger("bench"),
                             step_metrics=StepClock())
        recovered, metrics = RECOVERY.get(method)().recover(loaded, ctx)
        model = recovered.model
        result["step_cpu_s"] = median_step_cpu_s(ctx.step_metrics.ends)
        result.update(steps_per_s=metrics["train.steps_per_s"],
                      eval_loss=metrics["train.eval_loss"],
                      trainable=metrics["train.trainable_params"],
                      train_peak_mb=metrics["train.peak_memory_mb"],
                      sparsity_preserved=metrics.get("recover.sparsity_preserved"))
    else:
        model, result["steps_per_s"], result["trainable"], result["train_peak_mb"], \
            result["eval_loss"], result["step_cpu_s"] = trainer_loop(loaded, cell, source)
    # CPU seconds of the whole recovery (data, adapter, loop, held-out loss), which other
    # processes do not inflate the way they inflate wall time (one thread: OMP_NUM_THREADS=1).
    result["cpu_steps_per_s"] = spec["steps"] / (_cpu_seconds() - cpu_start)
    result["load_after"] = os.getloadavg()[0]
    result["ppl_after"] = ppl(model)
    result["squad_after"] = squad(model) if scored else None
    result["sparsity_after"] = sparsity_report(model)[1]["sparsity.linear"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def trainer_loop(loaded, cell, source):
    """The plain reference: peft (for LoRA) + transformers.Trainer on the same examples, doing the
    same job as sparselab: the held-out loss at the end, and for dense the pruned weights kept at
    zero (gradients masked in a hook, weights re-zeroed after each optimizer step)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sparselab.recover.lora import resolve_targets
    from sparselab.recover.prompts import build_training_set, collate
    from sparselab.memory import PeakMemory
    cfg = cell.recover
    data = build_training_set(loaded.tokenizer, cfg.data, source, cfg.train.samples,
                              cfg.train.seqlen, cfg.train.seed)
    model = loaded.model
    callbacks = []
    if cfg.method == "lora":
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=resolve_targets(cfg.lora.targets), task_type="CAUSAL_LM"))
    else:  # keeping the sparsity, as a Trainer user would: a gradient hook and a callback
        for param in model.parameters():
            param.requires_grad_(True)
        from sparselab.prune.layers import prunable_linears
        weights = [linear.weight for linear in prunable_linears(model).values()]
        kept = [weight != 0 for weight in weights]
        def masking(mask):
            def hook(weight) -> None:  # before clipping, like sparselab's mask
                weight.grad.mul_(mask)
            return hook

        for weight, mask in zip(weights, kept):
            weight.register_post_accumulate_grad_hook(masking(mask))

        class Remask(TrainerCallback):
            def on_optimizer_step(self, *_, **__):
                with torch.no_grad():
                    for weight, mask in zip(weights, kept):
                        weight.mul_(mask)
        callbacks.append(Remask())
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.lr, lr_scheduler_type=cfg.train.schedule,
        warmup_steps=cfg.train.warmup_steps, max_grad_norm=cfg.train.max_grad_norm,
        weight_decay=cfg.train.weight_decay, logging_steps=10, report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=cfg.train.seed,
        dataloader_num_workers=0, remove_unused_columns=False)
    pad = loaded.tokenizer.pad_token_id
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.thread_time())

    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      data_collator=lambda batch: collate(batch, pad),
                      callbacks=[Clock(), *callbacks])
    with PeakMemory(next(model.parameters()).device) as memory:
        output = trainer.train()
    eval_loss = trainer.evaluate(eval_dataset=data.held_out)["eval_loss"]
    steps = output.global_step
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    return (model, steps / output.metrics["train_runtime"], float(trainable),
            memory.peak_bytes / 2**20, eval_loss, median_step_cpu_s(ends))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--task-limit", type=int, default=0,
                        help="SQuAD v2 examples scored before/after (0: skip; ~2-5 s each)")
    parser.add_argument("--data", default="wikitext2,squad")
    parser.add_argument("--methods", default="lora,dense")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    pruned = str(pruned_folder(args.data_dir))
    done = ROWS.read_text().splitlines() if ROWS.is_file() else []
    finished = {json.dumps(row["spec"], sort_keys=True): row for row in map(json.loads, done)}

    settings = dict(pruned=pruned, data_dir=args.data_dir, steps=args.steps,
                    samples=args.samples, seqlen=args.seqlen, batch=args.batch,
                    max_windows=args.max_windows, task_limit=args.task_limit)

    def measure(**spec) -> dict:
        """One configuration in its own process, measured once and then kept in ROWS."""
        spec.update(settings)
        row = finished.get(json.dumps(spec, sort_keys=True))
        if row is None:
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                 capture_output=True, text=True, cwd=REPO)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{spec['loop']} {spec['method']} {spec['data']} failed:\n"
                         f"{out.stderr[-3000:]}")
            row = {"spec": spec, **json.loads(line[7:])}
            ROWS.parent.mkdir(parents=True, exist_ok=True)
            with ROWS.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            finished[json.dumps(spec, sort_keys=True)] = row
        print(row, flush=True)
        return row

    for data in args.data.split(","):
        measure(loop="before", method="none", data=data)
        for method in args.methods.split(","):
            for loop in ("sparselab", "trainer"):
                measure(loop=loop, method=method, data=data)
    # the table: every configuration measured with these settings, this run's and earlier ones
    same = [row for row in finished.values()
            if all(row["spec"][k] == v for k, v in settings.items())]
    before = {row["spec"]["data"]: row for row in same if row["spec"]["loop"] == "before"}
    order = {"wikitext2": 0, "squad": 1, "lora": 0, "dense": 1, "sparselab": 0, "trainer": 1}
    rows = sorted((row for row in same if row["spec"]["loop"] != "before"),
                  key=lambda r: [order.get(r[k], 2) for k in ("data", "method", "loop")])
    write([{**row, "ppl_before": before[row["data"]]["ppl"],
            "squad_before": before[row["data"]]["squad"] if row["squad_after"] else None}
           for row in rows], args)


def write(rows: list[dict], args) -> None:
    lines = header("Recovery on SmolLM2-135M (50% Wanda): sparselab vs peft + Trainer")
    lines += [f"{args.steps} optimizer steps, batch {args.batch} x {args.seqlen} tokens, "
              f"{args.samples} examples; LoRA r=8 on q,v (lr 2e-4), dense all weights (lr 2e-5); "
              f"perplexity on {args.max_windows} windows of 512 of the WikiText-2 test split; "
              f"SQuAD v2 on its first {args.task_limit} validation questions. A step of dense "
              "fine-tuning costs ~15 CPU-seconds here, so the steps are a few dozen, not the few "
              "hundred a GPU would run: enough to time the loops and to see the scores move.", "",
              "- steps/s (wall): the loop's own timing; other processes on the machine slow it "
              "(load = 1-minute load average before / after).",
              "- CPU-s per step: the median, over the run's steps, of the thread's CPU time "
              "from one optimizer step's end to the next (batch, forward, backward, clipping, "
              "optimizer; one thread). CPU time leaves out the waiting that other processes "
              "cause and the median leaves out bursts of contention; the vs-Trainer speed ratio "
              "(Trainer's CPU-s per step over ours: above 1 is faster) uses it.",
              "- steps per CPU-s (whole): steps over the CPU time of the whole recovery (data, "
              "adapter, loop and the held-out loss at the end, the same work on both sides).",
              "- train peak MB: resident memory sampled during training; max RSS: the whole "
              "process (model load and perplexity included).",
              "- held-out loss: sparselab's is the mean over every target token; Trainer's "
              "evaluate averages the batches' means. Equal on packed text, not on SQuAD, whose "
              "answers differ in length.",
              "- The table holds every configuration measured with these settings (kept in "
              ".sparselab/bench/recover_rows.jsonl), also by earlier invocations that chose "
              "other --data / --methods.", "",
              "| data | method | loop | steps/s (wall) | load | CPU-s per step | speed vs Trainer | "
              "steps per CPU-s (whole) | "
              "train peak MB | max RSS MB | trainable | held-out loss | ppl before | ppl after | "
              "sparsity after | "
              "SQuAD v2 F1 before → after | HasAns F1 | NoAns F1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next((t for t in rows if t["loop"] == "trainer" and t["data"] == r["data"]
                    and t["method"] == r["method"]), None)
        ratio = f"{ref['step_cpu_s'] / r['step_cpu_s']:.2f}" if ref else "–"
        f1 = " | ".join(f"{r['squad_before'][m]:.1f} → {r['squad_after'][m]:.1f}"
                        if r["squad_before"] else "–" for m in ("f1", "HasAns_f1", "NoAns_f1"))
        lines.append(f"| {r['data']} | {r['method']} | {r['loop']} | {r['steps_per_s']:.3f} | "
                     f"{r['load_before']:.1f}/{r['load_after']:.1f} | "
                     f"{r['step_cpu_s']:.2f} | {ratio} | {r['cpu_steps_per_s']:.3f} | "
                     f"{r['train_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['trainable']:.0f} | {r['eval_loss']:.3f} | {r['ppl_before']:.2f} | "
                     f"{r['ppl_after']:.2f} | "
                     f"{r['sparsity_after']:.4f} | {f1} |")
    lines += ["", "The Trainer rows are the reference, doing the same job: dense there masks the "
              "pruned weights' gradients in a hook and re-zeroes them in a callback, so both end "
              "at the pruned model's sparsity."]
    out = REPO / "benchmarks" / "results" / "recover_smollm2.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
