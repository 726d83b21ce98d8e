"""Charts logged as artifacts (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layer_sparsity(per_layer: dict[str, dict[str, float]], file: Path) -> None:
    names = list(per_layer)
    values = [per_layer[n]["sparsity"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12), 3.5))
    ax.bar(range(len(names)), values, color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("achieved sparsity")
    ax.set_xlabel("linear layer (in model order)")
    step = max(1, len(names) // 20)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([names[i].removeprefix("model.layers.") for i in range(0, len(names), step)],
                       rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def plot_series(values: list[float], file: Path, ylabel: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(values)), values)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)
