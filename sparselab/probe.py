"""Measure one stage's peak memory beside the plan's prediction, in a process of its own.

    python -m sparselab.probe --model random-llama-3.2-1b --dtype bfloat16 --stage prune \\
        --set prune.method=wanda --set prune.calibration.samples=8

The model is built (random shapes) or converted once into `--models` (a folder of built models),
loaded, and then the stage's own computation runs on it: the prune method, the perplexity or
answer-loss pass, the recovery method, with the cell's settings (a tiny-llama-sized default cell,
`--set` overrides, data from the built-in fixtures unless `--data-dir`). The peak is the
accelerator's allocated peak on CUDA; on the CPU the process's resident peak (VmHWM, reset when
the stage starts) above the resident set before the model was loaded. One JSON line is printed:
the measured peak, the prediction and its terms. Tests and benchmarks/scale.py compare the two.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

STAGES = ("load", "prune", "perplexity", "answer_loss", "recover", "speed")


def resident() -> tuple[int, int]:
    """(current, peak) resident set of this process in bytes, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{key}:\s+(\d+)", status).group(1)) * 1024
                for key in ("VmRSS", "VmHWM"))
    return rss, hwm


def reset_peak(device: str) -> None:
    import torch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_since_reset(device: str, base: int) -> int:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resident()[1] - base


def _fixed_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so freed
    tensors below it stay in the heap and the resident peak drifts above what was held; a fixed
    threshold returns every large block to the system when it is freed."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: the measurement keeps some allocator slack
        pass


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--data-dir", default="builtin")
    parser.add_argument("--models", default=None, help="folder of built models (reused)")
    parser.add_argument("--onload", action="store_true")
    parser.add_argument("--zeros", type=float, default=0.0,
                        help="zero this share of every decoder linear's smallest weights first "
                        "(a pruned parent, for the speed stage's sparse kernels)")
    parser.add_argument("--shape", help="JSON Llama config fields: registers --model as a "
                        "random Llama of that shape (for sizes between the published ones)")
    args = parser.parse_args(argv)
    _fixed_mmap_threshold()
    if args.shape:
        from sparselab.models import RandomLlama
        from sparselab.registry import MODELS
        RandomLlama.shapes[args.model] = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                                          **json.loads(args.shape)}
        if args.model not in MODELS:
            MODELS.register(args.model, RandomLlama, "a probe's shape")

    import torch

    from sparselab.data.catalog import resolve_data_dir
    from sparselab.footprint import MemoryContext, Shape
    from sparselab.matrix import CellConfig, parse_set, set_dotted
    from sparselab.models import compute_device, load_model, model_source
    from sparselab.stages import kind_named

    tree: dict = {"model": args.model, "dtype": args.dtype}
    for dotted, value in parse_set(tuple(args.sets)).items():
        set_dotted(tree, dotted, value)
    cell = CellConfig.model_validate(tree)
    source = model_source(args.model)
    folder = Path(args.models or Path.home() / ".cache" / "sparselab-probe") / \
        f"{args.model}-{args.dtype}"
    if source.needs_build and not (folder / "config.json").is_file():
        source.build(folder, args.dtype)
    device = compute_device()
    m = MemoryContext(Shape.of(source.config()), args.dtype, onload=args.onload,
                      zeros=args.zeros)
    kind = kind_named(args.stage)
    section = kind.section_of(cell)
    need = kind.memory(section, m)

    data = resolve_data_dir(args.data_dir)
    # the same stage on tiny-llama first: imports, tokenizers and library caches are then in
    # the baseline, and only what the model and the stage hold is measured
    tiny = Path(folder.parent / "tiny-llama")
    if not (tiny / "config.json").is_file():
        model_source("tiny-llama").build(tiny)
    warm = load_model(tiny)
    if args.stage != "load":
        _run(args.stage, section, warm, data)
    del warm
    gc.collect()
    base = resident()[0] if not device.startswith("cuda") else 0
    reset_peak(device)
    start = time.perf_counter()
    loaded = load_model(folder if source.needs_build else args.model, dtype=args.dtype)
    _touched(loaded)
    if args.zeros:
        _zero_smallest(loaded.model, args.zeros)
    if args.stage != "load":
        reset_peak(device)
        start = time.perf_counter()
        _run(args.stage, section, loaded, data)
    measured = peak_since_reset(device, base)
    result = {"model": args.model, "dtype": args.dtype, "stage": args.stage,
              "settings": args.sets, "device": device, "onload": args.onload,
              "measured": measured, "predicted": need.device if need else None,
              "parts": need.parts if need else {}, "seconds": time.perf_counter() - start,
              "torch": torch.__version__}
    print(json.dumps(result))
    return result


def _touched(loaded):
    """Read every weight once: weights memory-mapped from the file count once they are read
    (on a GPU they are all copied to it)."""
    import torch
    with torch.no_grad():
        for param in loaded.model.parameters():
            param.sum()
    return loaded


def _zero_smallest(model, share: float) -> None:
    """Magnitude pruning of every decoder linear to `share`. The weights are copied out of the
    memory-mapped file first: its pages stay resident while any tensor views the file, and the
    speed stage lets the dense weights go (a pruned parent's weights are its own)."""
    import torch

    from sparselab.prune.layers import prunable_linears
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        gc.collect()
        for linear in prunable_linears(model).values():
            weight = linear.weight.view(-1)
            weight[weight.abs().argsort()[:int(weight.numel() * share)]] = 0


def _run(stage: str, section, loaded, source) -> None:
    import logging
    import tempfile

    log = logging.getLogger("sparselab.probe")
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "prune":
            from sparselab.prune.base import PruneContext
            from sparselab.registry import PRUNING
            PRUNING.get(section.method)().prune(loaded, PruneContext(section, source,
                                                                     Path(tmp), log))
        elif stage == "perplexity":
            from sparselab.evaluate.perplexity import window_losses, windows_of
            from sparselab.registry import DATASETS
            dataset = DATASETS.get(section.data)()
            windows = windows_of(loaded.tokenizer, dataset.text(source, dataset.eval_split),
                                 section.seqlen, section.max_windows)
            window_losses(loaded.model, windows, section.batch_size)
        elif stage == "answer_loss":
            from sparselab.evaluate.answer_loss import example_losses
            from sparselab.registry import DATASETS
            for name in section.data:
                dataset = DATASETS.get(name)()
                examples = dataset.examples(source, dataset.eval_split)[:section.limit]
                example_losses(loaded.model, loaded.tokenizer, examples, section.seqlen,
                               section.batch_size)
        elif stage == "recover":
            from sparselab.recover.base import RecoverContext
            from sparselab.registry import RECOVERY
            ctx = RecoverContext(section, source, Path(tmp), log)
            if section.method == "reconstruct":  # its targets: the same weights, unpruned
                from sparselab.models import load_model
                folder = loaded.model.name_or_path
                ctx.dense = lambda: _touched(load_model(folder,
                                                        dtype=str(loaded.model.dtype)[6:]))
            RECOVERY.get(section.method)().recover(loaded, ctx)
        elif stage == "speed":
            from sparselab.evaluate.speed import SpeedSettings, speed
            speed(loaded.model, SpeedSettings.of(section), vocab=loaded.model.config.vocab_size)


if __name__ == "__main__":
    main(sys.argv[1:])
