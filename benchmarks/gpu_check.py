"""Sparse kernels on a GPU, through the speed stage's own code (sparselab.evaluate.speed).

Llama-shaped models with random weights in bfloat16 (timing does not depend on the values):
SmolLM2-135M's shapes, and four layers of Llama-2-7B's. Each is timed dense, then pruned by
magnitude to 2:4 (the semi-structured kernel: cuSPARSELt or CUTLASS on sparse tensor cores),
50% unstructured (CSR, cuSPARSE) and 16x16 blocks (BSR), each kernel's logits checked against
the dense ones. Needs a CUDA GPU and the Python that holds CUDA torch and transformers; run it
with the device tool (benchmarks/gpu_check.sh says how) and record what it prints.

    python3 benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (hidden, intermediate, heads, kv heads, layers, vocab)
    "smollm2-135m shapes": (576, 1536, 9, 3, 30, 49152),
    "llama-2-7b shapes, 4 layers": (4096, 11008, 32, 32, 4, 32000),
}
PATTERNS = ("2:4", "unstructured", "block:16x16")


def prune(model, pattern: str) -> None:
    """Zero each prunable linear by magnitude: keep 2 of every 4, or the top half per row, or the
    half of the 16x16 blocks with the largest summed magnitude."""
    import torch

    from sparselab.prune.layers import prunable_linears
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            w = linear.weight
            score = w.abs().float()
            if pattern == "2:4":
                groups = score.reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                    2, groups.topk(2, dim=2).indices, True).reshape(w.shape)
            elif pattern == "unstructured":
                keep = score >= score.median(dim=1, keepdim=True).values
            else:
                blocks = score.reshape(w.shape[0] // 16, 16, -1, 16).sum(dim=(1, 3))
                keep = (blocks >= blocks.median()).repeat_interleave(16, 0) \
                    .repeat_interleave(16, 1)
            w.mul_(keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_check.md")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparselab.evaluate.speed import SpeedSettings, speed
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (benchmarks/gpu_check.sh)")
        return 2
    device = torch.device("cuda")
    settings = SpeedSettings(prompt_lengths=(512, 2048), batch_sizes=(1, 16), decode_prompt=128,
                             new_tokens=64, warmup=3, repeats=args.repeats)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# Sparse kernels on {torch.cuda.get_device_name(device)}", "",
             f"`python3 benchmarks/gpu_check.py` at {when}; "
             f"torch {torch.__version__}, bfloat16, random weights, {settings}", "",
             "| model | pattern | kernel | decode tok/s b1 (dense → kernel) | b16 "
             "| prefill ms 2048 "
             "| weights MB | max abs diff | note |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (hidden, inter, heads, kv, layers, vocab) in SHAPES.items():
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                             num_attention_heads=heads, num_key_value_heads=kv,
                             num_hidden_layers=layers, vocab_size=vocab,
                             max_position_embeddings=4096)
        for pattern in PATTERNS:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
            prune(model, pattern)
            result = speed(model, settings, vocab)
            m, k = result.metrics, result.kernel
            own = "speed." if k == "none" else f"speed.{k}."
            lines.append(
                f"| {name} | {pattern} | {k} | {m['speed.dense.decode_tok_s_b1']:.0f} → "
                f"{m[own + 'decode_tok_s_b1']:.0f} | {m['speed.dense.decode_tok_s_b16']:.0f} → "
                f"{m[own + 'decode_tok_s_b16']:.0f} | {m['speed.dense.prefill_ms_2048']:.2f} → "
                f"{m[own + 'prefill_ms_2048']:.2f} | {m['speed.dense.weights_mb']:.0f} → "
                f"{m[own + 'weights_mb']:.0f} | "
                f"{m.get(f'speed.{k}.max_abs_diff', float('nan')):.3g} "
                f"| {'; '.join(f'{a}: {b}' for a, b in result.notes.items())} |")
            print(lines[-1], flush=True)
            del model
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
