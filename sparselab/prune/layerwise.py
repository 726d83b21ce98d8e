"""The shared driver of the calibrated methods (Wanda, SparseGPT): one decoder layer at a time,
its linears' input statistics gathered in one pass of the still-unpruned layer (sparselab.prune.walk).
"""
from __future__ import annotations

import abc
import json

import torch
from torch import nn

from sparselab import progress
from sparselab.prune.base import PruneContext, PruningMethod
from sparselab.prune.calibration import calibration_set
from sparselab.prune.layers import linear_modules, prunable_linears
from sparselab.prune.options import OwlOptions
from sparselab.prune.owl import layer_sparsities, outlier_share, validate_ratios
from sparselab.prune.patterns import Pattern, check_against_model
from sparselab.prune.walk import record_inputs, run_layer, walk_layers
from sparselab.shapes import decoder_layers

# --- activation statistics -----------------------------------------------------------------------

class InputNorms:
    """Wanda's `scaler_row`: per input column, the squared inputs summed over every calibration
    token, divided by the number of calibration sequences (accumulated in float32)."""

    def __init__(self, columns: int, device: torch.device):
        self.sq = torch.zeros(columns, dtype=torch.float32, device=device)
        self.sequences = 0

    @staticmethod
    def increment(x: torch.Tensor) -> tuple[int, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1]).float()
        return (x.shape[0] if x.dim() == 3 else 1), (flat * flat).sum(dim=0)

    def accumulate(self, increment: tuple[int, torch.Tensor]) -> None:
        self.sequences += increment[0]
        self.sq += increment[1]

    def add(self, x: torch.Tensor) -> None:
        self.accumulate(self.increment(x))

    @property
    def scaler_row(self) -> torch.Tensor:
        return self.sq / max(self.sequences, 1)

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """|W_ij| * ||X_j||_2, float32."""
        return weight.detach().float().abs() * self.scaler_row.sqrt().unsqueeze(0)


# --- the shared driver of the calibrated methods -------------------------------------------------


class LayerwisePruning(PruningMethod):
    """Calibrated pruning, one decoder layer at a time (Wanda, SparseGPT).

    For each decoder layer in order: one pass of the still-unpruned layer over the calibration
    inputs gathers the statistics of all its linears; each linear is pruned (`prune_linear`) and
    checked against its pattern; the pruned layer then runs again and its outputs are the next
    layer's inputs. Layers in `skip_layers` only pass their inputs on.
    """
    needs_calibration = True
    onloads = True

    def check(self, config) -> None:
        super().check(config)
        pattern = Pattern.parse(config.pattern)
        if config.layer_ratios != "uniform" and pattern.kind in ("nm", "tiers"):
            raise ValueError(f"layer_ratios '{config.layer_ratios}' cannot be used with pattern "
                             f"'{config.pattern}': N:M and tiers fix the sparsity of every layer; "
                             "use unstructured or block:BxB.")

    def check_model(self, config, model_config) -> None:
        check_against_model(config, Pattern.of(config), model_config)

    def memory(self, config, m):
        from sparselab.footprint import walk_need
        linears = m.shape.linears()
        seqlen = config.calibration.seqlen
        widest = max(i for _, i in linears.values())
        return walk_need(m, config.calibration.samples, seqlen,
                         {name: self.stat_bytes(i) for name, (_, i) in linears.items()},
                         {name: self.working_bytes(o, i, config, m)
                          for name, (o, i) in linears.items()},
                         self.increment_bytes(seqlen, widest, m))

    def stat_bytes(self, inputs: int) -> int:
        """Bytes of one linear's statistics (`new_stat`) for `inputs` input features."""
        return inputs * 4

    def increment_bytes(self, seqlen: int, inputs: int, m) -> int:
        """Transient bytes of one sample's statistics increment: its inputs as float32 and
        their squares."""
        return 2 * seqlen * inputs * 4

    def working_bytes(self, out: int, inputs: int, config, m) -> int:
        """Transient bytes of `prune_linear` on an (out x inputs) linear."""
        from sparselab.footprint import mask_working
        return mask_working(out, inputs, config.sparsity)

    @abc.abstractmethod
    def new_stat(self, linear: nn.Linear):
        """A fresh accumulator of this method's input statistics for one linear layer."""

    @abc.abstractmethod
    def prune_linear(self, name: str, linear: nn.Linear, stat, pattern: Pattern,
                     sparsity: float, options) -> tuple[torch.Tensor, float]:
        """Prune one linear in place; return its keep-mask and the rounding slack (in weights)."""

    def prune(self, loaded, ctx: PruneContext) -> dict[str, float]:
        config = ctx.config
        options = config.method_options
        pattern = Pattern.of(config)
        model = loaded.model
        layers = decoder_layers(model)
        validate_ratios(config, len(layers))
        for name, linear in prunable_linears(model).items():  # fail before any work
            pattern.check_shape(name, tuple(linear.weight.shape))
        calib = calibration_set(loaded.tokenizer, config.calibration, ctx.source)
        ctx.log.info("calibration: %s, %d x %d tokens, splits %s, sha256 %s",
                     calib.fingerprint["data"], calib.samples, calib.seqlen, calib.splits,
                     calib.fingerprint["sha256"][:12])
        owl = getattr(options, "owl", None)
        shares = None
        if config.layer_ratios == "owl":
            shares = outlier_shares(model, calib.input_ids, (owl or OwlOptions()).M,
                                    set(config.skip_layers))
        sparsities = layer_sparsities(config, len(layers), shares, owl)
        _write_json(ctx, "calibration.json", calib.fingerprint)
        _write_json(ctx, "layer_ratios.json", {"layer_ratios": sparsities,
                                               "outlier_shares": shares})
        achieved = self.prune_layers(model, calib.input_ids, pattern, sparsities, options,
                                     set(config.skip_layers), ctx.log)
        return {"prune.calibration_tokens": float(calib.input_ids.numel()),
                "prune.masked_share": achieved}

    @torch.no_grad()
    def prune_layers(self, model: nn.Module, input_ids: torch.Tensor, pattern: Pattern,
                     sparsities: list[float], options, skip: set[int], log=None) -> float:
        """The layer walk; returns the share of weights the masks removed (skipped layers: 0)."""
        pruned = total = 0
        layer_count = len(decoder_layers(model))
        for index, layer, inputs in walk_layers(model, input_ids):
            progress.report(index, layer_count, "layers")
            linears = linear_modules(layer)
            total += sum(linear.weight.numel() for linear in linears.values())
            if index in skip:
                continue
            stats = {name: self.new_stat(linear) for name, linear in linears.items()}
            with record_inputs(linears, stats):
                run_layer(layer, inputs, update=False)
            target = pattern.target(sparsities[index])
            for name, linear in linears.items():
                full = f"model.layers.{index}.{name}"
                keep, slack = self.prune_linear(full, linear, stats.pop(name), pattern,
                                                sparsities[index], options)
                share = pattern.verify(full, linear.weight, keep, target, slack)
                pruned += share * keep.numel()
            if log is not None:
                log.info("layer %d pruned to %.4f", index, target)
        return pruned / total if total else 0.0


@torch.no_grad()
def outlier_shares(model: nn.Module, input_ids: torch.Tensor, M: float,
                   skip: set[int]) -> list[float]:
    """OWL's first pass over the dense model: per decoder layer, the share (%) of Wanda scores
    above M times the layer's mean score (0 for skipped layers)."""
    shares = []
    for index, layer, inputs in walk_layers(model, input_ids):
        if index in skip:
            shares.append(0.0)
            continue
        linears = linear_modules(layer)
        stats = {name: InputNorms(linear.in_features, linear.weight.device)
                 for name, linear in linears.items()}
        with record_inputs(linears, stats):
            run_layer(layer, inputs, update=False)
        shares.append(outlier_share([stats[name].scores(linear.weight)
                                     for name, linear in linears.items()], M))
    return shares


def _write_json(ctx: PruneContext, name: str, data: dict) -> None:
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    (ctx.artifacts / name).write_text(json.dumps(data, indent=2) + "\n")
