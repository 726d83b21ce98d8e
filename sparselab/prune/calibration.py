"""Calibration data for the pruning methods, and the layer-by-layer walk over its activations.

```yaml
prune:
  calibration: {data: wikitext2, samples: 128, seqlen: 512, seed: 0}
  # or a mixture: {data: {mix: {wikitext2: 0.5, squad: 0.5}}, samples: 128, seqlen: 512}
```

The samples (`calibration_set`):
- plain-text corpora, drawn as the `get_wikitext2` / `get_c4` loaders of the Wanda and SparseGPT
  code draw them, so the same text and seed give the reference's very windows: Python's
  `random.seed(seed)`, then per sample `randint(0, tokens - seqlen - 1)` as the window start, the
  text tokenized as the tokenizer does by default (a Llama tokenizer's BOS included). WikiText-2
  joins its training split with " " and tokenizes it once; C4 draws a document
  (`randint(0, documents - 1)`) until one has more than `seqlen` tokens, then a window inside it;
- task data (SQuAD, GSM8K, BoolQ): one rendered example (`prompt + answer`) per sample, examples
  visited in a seeded random order; an example shorter than `seqlen` gets the next examples packed
  after it (separated by EOS), so every sample really is `seqlen` tokens long;
- a mixture: each source supplies round(samples * weight) samples (largest remainder, so the counts
  add up to `samples`), in the mixture's (sorted) order.
The split is `dataset.training_split(source)`: `train`, else `validation` when that is not the split
evaluation scores; never the evaluation split. The same settings give the same ids on every machine.

The walk (`capture_layer_inputs`, `run_layer`, `walk_layers`): the first decoder layer's inputs and
keyword arguments (position embeddings, attention mask, position ids) are caught by a forward
pre-hook that stops the forward pass; then each decoder layer runs on its inputs, one sample at a
time, and its outputs replace them in place as the next layer's inputs. Only one layer's activations
(samples x seqlen x hidden, in the model's dtype) are ever held.
"""
from __future__ import annotations

import abc
import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparselab import progress
from sparselab.data.catalog import DataSource, TaskDataset, TextCorpus
from sparselab.data.mixture import apportion
from sparselab.matrix import Calibration, data_components, describe_data
from sparselab.prune.base import PruneContext, PruningMethod
from sparselab.prune.layers import linear_modules, prunable_linears
from sparselab.prune.options import OwlOptions
from sparselab.prune.owl import layer_sparsities, outlier_share, validate_ratios
from sparselab.prune.patterns import Pattern, check_against_model
from sparselab.shapes import decoder_layers


@dataclass
class CalibrationSet:
    """`input_ids` (samples x seqlen) and a fingerprint that identifies them (for logs and keys)."""
    input_ids: torch.Tensor
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def splits(self) -> dict[str, str]:
        return dict(self.fingerprint.get("splits", {}))


def calibration_set(tokenizer, calibration: Calibration, source: DataSource,
                    seed: int | None = None) -> CalibrationSet:
    """The calibration samples of a `prune.calibration` config (see the module docstring)."""
    from sparselab.registry import DATASETS
    seed = seed if seed is not None else calibration.seed if calibration.seed is not None else 0
    samples, seqlen = calibration.samples, calibration.seqlen
    counts = apportion(samples, data_components(calibration.data))
    parts, splits, per_source = [], {}, {}
    for name, count in counts.items():
        dataset = DATASETS.get(name)()
        split = dataset.training_split(source)
        splits[name] = split
        if count == 0:
            per_source[name] = {"split": split, "samples": 0}
            continue
        if isinstance(dataset, TextCorpus):
            ids, available = _text_windows(tokenizer, dataset, source, split, count, seqlen, seed)
        elif isinstance(dataset, TaskDataset):
            ids, available = _task_samples(tokenizer, dataset, source, split, count, seqlen, seed)
        else:
            raise ValueError(f"dataset '{name}' cannot be used for calibration")
        parts.append(ids)
        per_source[name] = {"split": split, "samples": count, **available}
    input_ids = torch.cat(parts, dim=0)
    assert input_ids.shape == (samples, seqlen), input_ids.shape
    fingerprint = {
        "data": describe_data(calibration.data),
        "splits": splits,
        "sources": per_source,
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens": int(input_ids.numel()),
        "sha256": ids_sha256(input_ids),
    }
    return CalibrationSet(input_ids, fingerprint)


def ids_sha256(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _encode(tokenizer, text: str, special_tokens: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special_tokens, return_attention_mask=False,
                     verbose=False)["input_ids"]


def _text_windows(tokenizer, dataset: TextCorpus, source: DataSource, split: str, count: int,
                  seqlen: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """`count` windows as the reference loaders draw them (see the module docstring)."""
    draw = random.Random(seed)
    if dataset.calibration_join is None:
        return _document_windows(tokenizer, dataset, source, split, count, seqlen, draw)
    ids = _encode(tokenizer, dataset.text(source, split, dataset.calibration_join), True)
    if len(ids) <= seqlen:
        raise ValueError(f"calibration dataset '{dataset.name}' ({split} split) has {len(ids)} "
                         f"tokens, too few for windows of seqlen {seqlen} (it needs more than "
                         f"{seqlen}); lower prune.calibration.seqlen or use more text.")
    starts = [draw.randint(0, len(ids) - seqlen - 1) for _ in range(count)]
    windows = [ids[s:s + seqlen] for s in starts]
    return torch.tensor(windows, dtype=torch.long), {"tokens_available": len(ids)}


def _document_windows(tokenizer, dataset: TextCorpus, source: DataSource, split: str, count: int,
                      seqlen: int, draw: random.Random) -> tuple[torch.Tensor, dict[str, int]]:
    """Per sample: documents drawn until one is longer than `seqlen`, then a window inside it."""
    documents = [r["text"] for r in dataset.records(source, split)]
    encoded: dict[int, list[int]] = {}
    too_short: set[int] = set()
    windows = []
    for _ in range(count):
        while True:
            index = draw.randint(0, len(documents) - 1)
            if index not in encoded:
                encoded[index] = _encode(tokenizer, documents[index], True)
            if len(encoded[index]) > seqlen:
                break
            too_short.add(index)
            if len(too_short) == len(documents):
                raise ValueError(f"calibration dataset '{dataset.name}' ({split} split) has no "
                                 f"document longer than seqlen {seqlen} tokens; lower "
                                 f"prune.calibration.seqlen.")
        start = draw.randint(0, len(encoded[index]) - seqlen - 1)
        windows.append(encoded[index][start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long), {"documents_available": len(documents)}


def _task_samples(tokenizer, dataset: TaskDataset, source: DataSource, split: str, count: int,
                  seqlen: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    examples = dataset.examples(source, split)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    separator = ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                 else _encode(tokenizer, "\n\n"))
    rows, position = [], 0
    for _ in range(count):
        row: list[int] = []
        while len(row) < seqlen:
            if position >= len(order):
                raise ValueError(
                    f"calibration dataset '{dataset.name}' ({split} split, {len(examples)} "
                    f"examples) cannot supply {count} samples of {seqlen} tokens without reusing "
                    f"examples; lower prune.calibration.samples or seqlen.")
            prompt, answer = examples[order[position]]
            position += 1
            if row:
                row.extend(separator)
            row.extend(_encode(tokenizer, prompt + answer))
        rows.append(row[:seqlen])
    return (torch.tensor(rows, dtype=torch.long),
            {"examples_used": position, "examples_available": len(examples)})


# --- the layer-by-layer walk ---------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the pre-hook once the first decoder layer's inputs are caught."""


@dataclass
class LayerInputs:
    """The inputs of the current decoder layer for every calibration sample (batch 1 each)."""
    hidden: torch.Tensor  # samples x seqlen x hidden, model dtype
    kwargs: dict[str, Any]  # attention_mask, position_ids, position_embeddings, ...


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> LayerInputs:
    """Run the model up to its first decoder layer for every sample and keep what that layer got."""
    layers = decoder_layers(model)
    device = model_device(model)
    hidden: torch.Tensor | None = None
    caught: dict[str, Any] = {}

    def catch(_module, args, kwargs):
        state = args[0] if args else kwargs["hidden_states"]
        caught["hidden"] = state
        if "kwargs" not in caught:
            caught["kwargs"] = {k: v for k, v in kwargs.items()
                                if k not in ("hidden_states", "past_key_values", "past_key_value")}
            caught["kwargs"]["use_cache"] = False
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for index in range(input_ids.shape[0]):
            try:
                model(input_ids=input_ids[index:index + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the first decoder layer was never called")
            state = caught.pop("hidden")
            if hidden is None:
                hidden = torch.empty((input_ids.shape[0], *state.shape[1:]), dtype=state.dtype,
                                     device=state.device)
            hidden[index] = state[0]
    finally:
        handle.remove()
    return LayerInputs(hidden, caught["kwargs"])


@torch.no_grad()
def sample_outputs(layer: nn.Module, hidden: torch.Tensor,
                   kwargs: dict[str, Any]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, output) of `layer` on each sample in turn (batch 1, as the captured kwargs are);
    one at a time, so a caller may write each output over its input."""
    for index in range(hidden.shape[0]):
        out = layer(hidden[index:index + 1], **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        yield index, out[0]


def run_layer(layer: nn.Module, inputs: LayerInputs, update: bool) -> None:
    """Run `layer` on every sample; with `update`, its outputs replace the inputs in place."""
    for index, out in sample_outputs(layer, inputs.hidden, inputs.kwargs):
        if update:
            inputs.hidden[index] = out


@contextmanager
def record_inputs(linears: dict[str, nn.Module], stats: dict[str, Any]) -> Iterator[None]:
    """Feed the input of each named linear to `stats[name]` while the block runs.

    A statistic has `increment(x)` (what one input adds) and `accumulate(increment)`. Linears fed
    the very same tensor (q/k/v, gate/up) share one computed increment per statistic type.
    """
    last: dict[str, Any] = {"input": None, "increments": {}}

    def hook(name: str, x: torch.Tensor) -> None:
        stat = stats[name]
        if last["input"] is not x:
            last["input"], last["increments"] = x, {}
        key = type(stat)
        if key not in last["increments"]:
            last["increments"][key] = stat.increment(x.detach())
        stat.accumulate(last["increments"][key])

    handles = [linear.register_forward_hook(lambda _m, args, _out, name=name: hook(name, args[0]))
               for name, linear in linears.items()]
    try:
        yield
    finally:
        last.clear()
        for handle in handles:
            handle.remove()


def walk_layers(model: nn.Module, input_ids: torch.Tensor
                ) -> Iterator[tuple[int, nn.Module, LayerInputs]]:
    """Yield (index, layer, its inputs) in order; after each step the (possibly just pruned) layer
    is run on those inputs, and its outputs become the next layer's inputs."""
    layers = decoder_layers(model)
    use_cache, training = getattr(model.config, "use_cache", None), model.training
    model.config.use_cache = False
    model.eval()  # no dropout in the statistics
    try:
        inputs = capture_layer_inputs(model, input_ids)
        for index, layer in enumerate(layers):
            yield index, layer, inputs
            if index + 1 < len(layers):
                run_layer(layer, inputs, update=True)
    finally:
        model.config.use_cache = use_cache
        model.train(training)


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

    def check(self, config) -> None:
        super().check(config)
        pattern = Pattern.parse(config.pattern)
        if config.layer_ratios != "uniform" and pattern.kind in ("nm", "tiers"):
            raise ValueError(f"layer_ratios '{config.layer_ratios}' cannot be used with pattern "
                             f"'{config.pattern}': N:M and tiers fix the sparsity of every layer; "
                             "use unstructured or block:BxB.")

    def check_model(self, config, model_config) -> None:
        options = config.method_options
        check_against_model(config, Pattern.parse(config.pattern, getattr(options, "tiers", None)),
                            model_config)

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
        pattern = Pattern.parse(config.pattern, getattr(options, "tiers", None))
        model = loaded.model
        layers = decoder_layers(model)
        validate_ratios(config, len(layers))
        for name, linear in prunable_linears(model).items():  # fail before any work
            pattern.check_shape(name, tuple(linear.weight.shape))
        fixed = pattern.fixed_sparsity
        if fixed is not None and abs(fixed - config.sparsity) > 1e-9:
            ctx.log.warning("pattern '%s' fixes the sparsity at %.4f; prune.sparsity %.4f is not "
                            "used", config.pattern, pattern.fixed_sparsity, config.sparsity)
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
