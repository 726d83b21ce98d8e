"""Memory and time per stage at scale: the plan's predictions for 7B, 8B and 70B, and measured peaks.

    python benchmarks/scale.py predict                    # -> benchmarks/results/scale_plan.md
    python benchmarks/scale.py measure --out benchmarks/results/scale_cpu.md     # the CPU sizes
    python benchmarks/scale.py measure --only speed --out /tmp/speed.md          # some stages
    python3 benchmarks/scale.py measure --gpu --out $OUT/scale_gpu.md            # on a GPU

`predict` prints the memory plan (sparselab.footprint) of the seeds' stages at the guide's full
settings (bf16; calibration 128 x 2048; LoRA and dense recovery at 4 x 1024; perplexity at 2048;
lm-eval at batch 8), resident and with --onload, for random-weight models in Llama-2-7B's,
Llama-3-8B's and Llama-3-70B's shapes: the config alone decides, nothing is built.

`measure` runs each stage's own computation in a process of its own (`python -m sparselab.probe`)
on random-weight models and records its peak (resident set on a CPU, allocated peak on a GPU)
beside the prediction, and its wall time. On this 2-core CPU the sizes that fit: two Llama shapes
of 0.06 and 0.07 billion parameters with short calibration and training; with `--gpu`, the
Llama-3-8B shape (bf16) at the guide's settings (3 training steps), resident and onloaded
(benchmarks/gpu_check.sh runs it on the device tool's GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GUIDE = {  # the task_specific matrix's "full settings" (its header comment)
    "prune.calibration.samples": 128, "prune.calibration.seqlen": 2048,
    "recover.train.seqlen": 1024, "recover.train.batch_size": 4,
    "evaluate.perplexity.seqlen": 2048, "evaluate.perplexity.batch_size": 4,
    "evaluate.answer_loss.seqlen": 1024, "evaluate.batch_size": 8,
}


class Probe(NamedTuple):
    """One row: a stage at the GUIDE settings plus `settings`; `zeros` is the share of zeros the
    pruned parent left (the probe's --zeros), which the speed stage's sparse layouts depend on."""
    label: str
    stage: str
    settings: dict
    zeros: float = 0.0


STAGES = [Probe(*row) for row in [
    ("load", "load", {}),
    ("prune wanda 50%", "prune", {"prune.method": "wanda"}),
    ("prune sparsegpt 50%", "prune", {"prune.method": "sparsegpt"}),
    ("perplexity", "perplexity", {}),
    ("answer loss", "answer_loss", {}),
    ("recover lora q,v", "recover", {"recover.method": "lora"}),
    ("recover lora q,v, checkpointing", "recover",
     {"recover.method": "lora", "recover.train.gradient_checkpointing": True}),
    ("recover dense", "recover", {"recover.method": "dense"}),
    ("recover dense, checkpointing + adafactor", "recover",
     {"recover.method": "dense", "recover.train.gradient_checkpointing": True,
      "recover.train.optimizer": "adafactor"}),
    ("prune gqa_structured 25%, taylor + removal", "prune",
     {"prune.method": "gqa_structured", "prune.sparsity": 0.25}),
    ("prune gqa_structured 25%, magnitude + cosine", "prune",
     {"prune.method": "gqa_structured", "prune.sparsity": 0.25,
      "prune.options.importance": "magnitude", "prune.options.layer_importance": "cosine"}),
    ("speed, dense", "speed", {"evaluate.speed": {}}),
    ("speed, 50% unstructured (CSR)", "speed", {"evaluate.speed": {}}, 0.5),
]]
NEW_ON_GPU = 9  # the stages after the first nine are not in the device check sized for 10 min
SHAPES = ("random-llama-2-7b", "random-llama-3-8b", "random-llama-3-70b")


def predict(out: Path) -> None:
    from sparselab.footprint import MemoryContext, Shape, gib
    from sparselab.matrix import CellConfig, set_dotted
    from sparselab.models import model_source
    from sparselab.stages import kinds
    by_name = {k.name: k for k in kinds()}
    lines = ["# Predicted peak memory per stage at the guide's settings\n",
             f"`python benchmarks/scale.py predict` ({time.strftime('%Y-%m-%d')}; from the "
             "configs alone, sparselab.footprint). Accelerator peak, resident / with `--onload` "
             "(host then holds the weights); bf16; calibration 128 x 2048, training 4 x 1024, "
             "perplexity 4 x 2048, answer losses 8 x 1024, lm-eval batch 8 (prompts up to "
             "2,048 tokens assumed).\n",
             "| stage | " + " | ".join(n.removeprefix("random-") for n in SHAPES) + " |",
             "| --- |" + " --- |" * len(SHAPES)]
    for label, stage, extra, zeros in STAGES + [Probe("lm-eval tasks", "tasks", {})]:
        cells = []
        for name in SHAPES:
            tree: dict = {"model": name, "dtype": "bfloat16"}
            for key, value in {**GUIDE, **extra}.items():
                set_dotted(tree, key, value)
            cell = CellConfig.model_validate(tree)
            kind = by_name[stage]
            section = kind.section_of(cell)
            shape = Shape.of(model_source(name).config())
            resident = kind.memory(section, MemoryContext(shape, "bfloat16", zeros=zeros))
            onload = kind.onloads_for(section)
            onloaded = kind.memory(section, MemoryContext(shape, "bfloat16", True, zeros)) \
                if onload else None
            cells.append(gib(resident.device) + (f" / {gib(onloaded.device)}" if onloaded
                                                  else " / (not onloaded)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)


def measure(out: Path, gpu: bool, models: Path, only: str | None = None) -> None:
    if gpu:  # the guide's settings, 3 training steps; one call of the device tool (~10 min)
        settings = {**GUIDE, "recover.train.max_steps": 3, "recover.train.grad_accum": 1}
        runs = [("random-llama-3-8b", "bfloat16", settings, onload) for onload in (False, True)]
        shapes: dict[str, dict] = {}
    else:  # what this CPU can do in minutes
        small = {"prune.calibration.samples": 16, "prune.calibration.seqlen": 256,
                 "recover.train.samples": 16, "recover.train.max_steps": 2,
                 "recover.train.seqlen": 256, "recover.train.batch_size": 4,
                 "recover.train.grad_accum": 1, "evaluate.perplexity.max_windows": 8,
                 "evaluate.answer_loss.limit": 16}
        shapes = {
            "probe-a": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                            max_position_embeddings=2048),
            "probe-b": dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                            num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                            max_position_embeddings=2048),
        }
        # bf16 training on a CPU without bf16 matrix units is slow: a quarter of the tokens
        small_bf16 = {**small, "recover.train.seqlen": 128, "recover.train.batch_size": 2}
        runs = [("probe-a", "float32", small, False), ("probe-b", "bfloat16", small_bf16, False)]
    rows = []
    for name, dtype, settings, onload in runs:
        for label, stage, extra, zeros in STAGES[:NEW_ON_GPU] if gpu else STAGES:
            if only and only not in label:
                continue
            if onload and stage in ("load", "recover") and "reconstruct" not in str(extra):
                continue  # these take the whole model to the device: nothing to compare
            if gpu and extra.get("recover.method") == "dense" and "8b" in name \
                    and "recover.train.optimizer" not in extra:
                continue  # 8B dense + AdamW at 4 x 1024 is over 80 GB: the plan says so
            args = [sys.executable, "-m", "sparselab.probe", "--model", name, "--dtype", dtype,
                    "--stage", stage, "--models", str(models), "--data-dir", "builtin"]
            if name in shapes:
                args += ["--shape", json.dumps(shapes[name])]
            if onload:
                args.append("--onload")
            for key, value in {**settings, **extra}.items():
                args += ["--set", f"{key}={value}"]
            if zeros:
                args += ["--zeros", str(zeros)]
            env = {**os.environ, "SPARSELAB_ONLOAD": "1" if onload else "0"}
            done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
            if done.returncode != 0:
                rows.append(f"| {name} | {label} | {'yes' if onload else 'no'} | failed: "
                            f"{done.stderr.strip().splitlines()[-1][:120]} | | | |")
                print(rows[-1], flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(f"| {name} ({dtype}) | {label} | {'yes' if onload else 'no'} | "
                        f"{r['measured'] / 2**30:.3f} | {r['predicted'] / 2**30:.3f} | "
                        f"{r['measured'] / r['predicted']:.3f} | {r['seconds']:.1f} |")
            print(rows[-1], flush=True)
    device = "GPU" if gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    header = [f"# Measured peak memory per stage against the plan ({device})\n",
              f"`python benchmarks/scale.py measure{' --gpu' if gpu else ''}` "
              f"({time.strftime('%Y-%m-%d')}): each stage's own computation in a process of "
              "its own (`python -m sparselab.probe`); measured = "
              + ("the allocated peak (torch.cuda.max_memory_allocated)" if gpu else
                 "the resident peak above the loaded libraries (VmHWM)")
              + ", predicted = the memory plan (sparselab.footprint), seconds = the stage's wall "
              "time." + ("" if gpu else " Settings: calibration 16 x 256, 2 training steps of "
                         "4 x 256 (bf16: 2 x 128), 8 perplexity windows of 512, 16 answer-loss "
                         "examples."),
              "", "| model | stage | onload | measured GiB | predicted GiB | ratio | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    out.write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["predict", "measure"])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", type=Path, default=Path("/tmp/sparselab-scale-models"))
    parser.add_argument("--only", help="measure the stages whose label contains this")
    args = parser.parse_args()
    results = REPO / "benchmarks" / "results"
    if args.what == "predict":
        predict(args.out or results / "scale_plan.md")
    else:
        measure(args.out or results / ("scale_gpu.md" if args.gpu else "scale_cpu.md"),
                args.gpu, args.models, args.only)
