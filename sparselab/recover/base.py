"""What a recovery method is: fine-tuning that wins back accuracy without touching the sparsity.

The recover stage loads the pruned model, calls the method, then saves with the method's `save`
and reads back with its `load` (a LoRA method stores only its adapter).
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sparselab.data.catalog import DataSource
from sparselab.matrix import Recover
from sparselab.models import LoadedModel, load_model, save_model


@dataclass
class RecoverContext:
    """What a method is given beside the model: its section of the cell, nothing more."""
    config: Recover
    source: DataSource
    artifacts: Path
    log: logging.Logger
    step_metrics: list[dict[str, float]] = field(default_factory=list)  # per-step train.loss etc.
    # the model before pruning, loaded when called (reconstruction's targets); None: unknown
    dense: Callable[[], LoadedModel] | None = None


class RecoveryMethod(abc.ABC):
    needs_pruned_parent = False  # dense recovery needs the mask a pruning left
    passes_through = False  # True: the model comes out as it went in (no recover stage at all)
    onloads = False  # True: works layer by layer under --onload (sparselab.onload)

    def check(self, config: Recover, linear_names: set[str] | None = None) -> None:
        """Cheap validation before any model loads; raise ValueError with a clear message.
        `linear_names` are the model's linear module names where known."""

    def memory(self, config: Recover, m):
        """Predicted peak (sparselab.footprint.training_need); None: not predicted."""
        return None

    @abc.abstractmethod
    def recover(self, loaded: LoadedModel, ctx: RecoverContext) -> tuple[LoadedModel, dict]:
        """Fine-tune; return the recovered model and its metrics."""

    def save(self, loaded: LoadedModel, folder: Path) -> None:
        save_model(loaded, folder / "model")

    def load(self, parent: Callable[[], LoadedModel], folder: Path, dtype: str) -> LoadedModel:
        return load_model(folder / "model", dtype=dtype)
