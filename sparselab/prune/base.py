"""What a pruning method is: a named module that zeroes (or removes) weights of a loaded model.

The prune stage owns everything around the method: loading, saving, measuring the sparsity that
was actually achieved, timing and logging. A method only decides which weights go.
"""
from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from sparselab.cache import StageCache
from sparselab.data.catalog import DataSource
from sparselab.errors import UserError
from sparselab.matrix import Prune
from sparselab.models import LoadedModel
from sparselab.prune.options import NoOptions


@dataclass
class PruneContext:
    """What a method is given beside the model: its section of the cell, nothing more."""
    config: Prune
    source: DataSource
    artifacts: Path  # files written here are logged with the run
    log: logging.Logger
    model_key: str = ""  # stage key of the model being pruned: analyses cached beside it key on it
    model_code: str | None = None  # the code lineage that made that model (sparselab.provenance)
    cache: StageCache | None = None  # for a method's own cached analyses (e.g. layer importance)


class PruningMethod(abc.ABC):
    """Subclasses set `Options` (their `prune.options` model, from their torch-free config.py,
    which the schema validates: methods read `config.method_options`) and implement `prune`."""
    Options: type[BaseModel] = NoOptions
    patterns: tuple[str, ...] = ("unstructured", "nm", "block")
    needs_calibration = False  # when False, calibration settings do not enter the stage key
    passes_through = False  # True: the model comes out as it went in (no prune stage at all)
    onloads = False  # True: works layer by layer under --onload (sparselab.onload)
    leaves_zeros = True  # False: removes weights instead (the model shrinks, no zeros are left)

    def check(self, config: Prune) -> None:
        """Cheap validation before any model loads; raise ValueError with a clear message."""
        from sparselab.matrix import parse_pattern
        kind, args = parse_pattern(config.pattern)
        if kind not in self.patterns:
            raise ValueError(f"pattern '{config.pattern}' is not supported by method "
                             f"'{config.method}' (supported: {', '.join(self.patterns)}).")
        if "blocks" in config.options and kind not in ("block", "tiers"):
            raise ValueError(f"options.blocks says how the blocks of pattern block:RxC or tiers "
                             f"are compared; pattern '{config.pattern}' has no blocks. Remove "
                             f"options.blocks or use a block pattern.")
        from sparselab.prune.patterns import Pattern
        pattern = Pattern.of(config)
        fixed = pattern.fixed_sparsity
        if fixed is None or math.isclose(config.sparsity, fixed, abs_tol=1e-6):
            return
        if kind == "nm":
            n, m = args
            raise UserError(
                f"pattern '{config.pattern}' keeps {n} of every {m} weights (sparsity "
                f"{fixed:g}), but prune.sparsity is {config.sparsity:g}; set prune.sparsity: "
                f"{fixed:g} or leave it out. N:M counts the weights kept, as NVIDIA's 2:4 does "
                f"(the Wanda command line's prune_n counts those pruned: they agree only for 2:4 "
                f"and 4:8).", key="prune.sparsity")
        n, m = pattern.tiers.nm_args
        raise UserError(
            f"pattern 'tiers' with options.tiers.ratios {list(pattern.tiers.ratios)} and nm "
            f"'{pattern.tiers.nm}' prunes {fixed:g} of the weights (ratios[1] x (1 - {n}/{m}) "
            f"+ ratios[2]), but prune.sparsity is {config.sparsity:g}; set prune.sparsity: "
            f"{fixed:g} or leave it out, or choose ratios that give "
            f"{config.sparsity:g} (e.g. [0.25, 0.5, 0.25] with 2:4 gives 0.5).",
            key="prune.sparsity")

    def check_model(self, config: Prune, model_config) -> None:
        """Validation that needs the model's shape (its config, no weights); ValueError if bad."""

    def memory(self, config: Prune, m):
        """Predicted peak (sparselab.footprint): the model (onloaded: the layer visiting) and
        one linear's mask at a time, as magnitude-style methods hold; layer-wise methods add
        their walk."""
        from sparselab.footprint import Need, mask_working
        s = m.shape
        pruned = config.sparsity
        work = max(mask_working(o, i, pruned) for o, i in s.linears().values())
        return Need.of({"weights": m.resident_weights, "mask": work},
                       m.weights if m.onload else 0)

    @abc.abstractmethod
    def prune(self, loaded: LoadedModel, ctx: PruneContext) -> dict[str, float]:
        """Prune `loaded.model` in place; return extra metrics (may be empty)."""
