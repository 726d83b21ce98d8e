"""speed: what the model costs at inference (sparselab.evaluate.speed), on this hardware.

Numbers of one machine do not hold on another, so the key names the hardware and the thread
count: a cache shared between machines keeps one entry per machine, and an entry computed on a
machine other than the one its key names is refused instead of cached under the wrong name.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from sparselab.matrix import CellConfig, Speed
from sparselab.stages.base import StageContext, StageKind


def hardware_label() -> str:
    """The CPU model, and the NVIDIA GPUs where the driver lists them; read without torch, so a
    plan can name it."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpus = sorted(line.split(":", 1)[1].strip()
                  for path in Path("/proc/driver/nvidia/gpus").glob("*/information")
                  for line in path.read_text().splitlines() if line.startswith("Model"))
    return "; ".join([f"cpu: {cpu}", *(f"gpu: {gpu}" for gpu in gpus)])


def threads_of(section: Speed) -> int:
    """The section's threads, else the cores this process may use (all of them where the OS
    cannot say: not Linux)."""
    if section.threads:
        return section.threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class SpeedStage(StageKind):
    name = "speed"
    version = 2  # 2: the CSR layout holds its column indices only (1 also held the row indices)

    def section_of(self, cell: CellConfig) -> Speed | None:
        return cell.evaluate.added(self.name)

    def key_config(self, section: Speed) -> dict[str, Any]:
        return {**section.identity(), "threads": threads_of(section),
                "hardware": hardware_label()}

    def data_refs(self, section: Speed) -> None:
        return None  # random token ids: no dataset

    def label(self, section: Speed) -> str:
        return (f"speed prefill {','.join(map(str, section.prompt_lengths))} tokens, decode "
                f"batch {','.join(map(str, section.batch_sizes))}")

    def memory(self, section: Speed, m):
        """The weights, dense, or while the sparse kernel runs in its layout, bounded by CSR's
        (a value and an int64 column index per kept weight, a row pointer per row; BSR and 2:4
        layouts are smaller), with one linear's conversion through COO; the larger of a
        prefill at the longest prompt (a layer's forward with its attention scores, then every
        position's logits) and a decode at the largest batch (the KV cache of prompt and new
        tokens, the prompt's prefill); with a sparse kernel, the two float32 logits compared
        with the dense ones."""
        from sparselab.evaluate.speed import MIN_ZEROS
        from sparselab.footprint import Need
        s, b = m.shape, m.bytes
        linears = s.linears().values()
        sparse = m.zeros >= MIN_ZEROS
        weights = m.weights
        if sparse:
            numel = s.layers * sum(o * i for o, i in linears)
            rows = s.layers * sum(o + 1 for o, _ in linears)
            kept = int(numel * (1 - m.zeros))
            # converting one linear: its mask, COO's indices and values, the column indices
            converting = int(s.largest_linear * (1 + (1 - m.zeros) * (16 + b + 8)))
            weights = max(weights, m.weights - numel * b + kept * (b + 8) + rows * 8
                          + converting)
        longest = max(section.prompt_lengths)
        # one layer's attention scores and probabilities in float32 where the kernel makes them
        # (a CPU's; a GPU's flash kernels do not: there this over-counts a little)
        scores = 2 * s.heads * longest * longest * 4
        prefill = max(m.layer_forward(longest) + scores, longest * s.vocab * b)
        prompt, batch = section.decode_prompt, max(section.batch_sizes)
        cache = 2 * s.layers * batch * (prompt + section.new_tokens) * s.kv_heads * s.head_dim * b
        decode = cache + max(m.layer_forward(batch * prompt), batch * prompt * s.vocab * b)
        check = 2 * 2 * min(64, section.prompt_lengths[0]) * s.vocab * 4 if sparse else 0
        return Need.of({"weights": weights, "inference": max(prefill, decode),
                        "kernel check": check}, 0)

    def compute(self, section: Speed, parent, ctx: StageContext) -> None:
        import torch

        from sparselab.evaluate.speed import SpeedSettings, speed
        from sparselab.shapes import base_model
        planned = ctx.keyed["hardware"]
        if planned != hardware_label():
            raise RuntimeError(f"this speed stage was planned for '{planned}' but runs on "
                               f"'{hardware_label()}'; plan and run it on the same machine")
        threads, previous = threads_of(section), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            result = speed(parent.model, SpeedSettings.of(section),
                           vocab=base_model(parent.model).config.vocab_size)
        finally:
            torch.set_num_threads(previous)
        (ctx.artifacts / "speed.json").write_text(json.dumps(
            {"hardware": planned, "threads": threads, "kernel": result.kernel,
             "kernels": result.notes}, indent=2))
        ctx.write_metrics({**result.metrics, "speed.threads": threads})
        ctx.write_tags({"sparselab.speed.kernel": result.kernel,
                        "sparselab.speed.hardware": planned,
                        "sparselab.speed.kernels": "; ".join(f"{name}: {about}" for name, about
                                                             in result.notes.items())})
