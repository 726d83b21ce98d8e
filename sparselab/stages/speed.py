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
    version = 1

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
            result = speed(parent.model, SpeedSettings(
                tuple(section.prompt_lengths), tuple(section.batch_sizes),
                section.decode_prompt, section.new_tokens, section.warmup, section.repeats),
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
