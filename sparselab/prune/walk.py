"""The layer-by-layer walk over calibration activations.

`capture_layer_inputs`, `run_layer`, `walk_layers`: the first decoder layer's inputs and
keyword arguments (position embeddings, attention mask, position ids) are caught by a forward
pre-hook that stops the forward pass; then each decoder layer runs on its inputs, one sample at a
time, and its outputs replace them in place as the next layer's inputs. Only one layer's activations
(samples x seqlen x hidden, in the model's dtype) are ever held: on the accelerator, or under
onloading in host memory, one sample visiting the accelerator at a time (llm-compressor's
sequential pipeline keeps its intermediates on the host the same way), so neither the calibration
set nor the model has to fit the device.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparselab.onload import HOST, execution_device, onloading, outer_modules, visiting
from sparselab.shapes import decoder_layers


class _StopForward(Exception):
    """Raised by the pre-hook once the first decoder layer's inputs are caught."""


@dataclass
class LayerInputs:
    """The inputs of the current decoder layer for every calibration sample (batch 1 each)."""
    hidden: torch.Tensor  # samples x seqlen x hidden, model dtype
    kwargs: dict[str, Any]  # attention_mask, position_ids, position_embeddings, ...


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> LayerInputs:
    """Run the model up to its first decoder layer for every sample and keep what that layer got
    (onloading: with the modules before the layers on the accelerator meanwhile, and the hidden
    states kept on the host; the keyword arguments, a few seqlen-sized tensors, stay on the
    accelerator)."""
    layers = decoder_layers(model)
    device = execution_device(model)
    store = torch.device(HOST) if onloading() else device
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
        with visiting(outer_modules(model), device):
            for index in range(input_ids.shape[0]):
                try:
                    model(input_ids=input_ids[index:index + 1].to(device), use_cache=False)
                except _StopForward:
                    pass
                else:  # pragma: no cover - the hook always fires
                    raise RuntimeError("the first decoder layer was never called")
                state = caught.pop("hidden")
                if hidden is None:
                    hidden = torch.empty((input_ids.shape[0], *state.shape[1:]),
                                         dtype=state.dtype, device=store)
                hidden[index] = state[0]
    finally:
        handle.remove()
    return LayerInputs(hidden, caught["kwargs"])


@torch.no_grad()
def sample_outputs(layer: nn.Module, hidden: torch.Tensor,
                   kwargs: dict[str, Any]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, output) of `layer` on each sample in turn (batch 1, as the captured kwargs are);
    one at a time, so a caller may write each output over its input. Each sample goes to the
    layer's device (from the host, under onloading); its output stays there."""
    device = next(layer.parameters()).device
    for index in range(hidden.shape[0]):
        out = layer(hidden[index:index + 1].to(device), **kwargs)
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
    is run on those inputs, and its outputs become the next layer's inputs. Onloading
    (sparselab.onload): each layer is on the accelerator from its step to its forward."""
    layers = decoder_layers(model)
    use_cache, training = getattr(model.config, "use_cache", None), model.training
    model.config.use_cache = False
    model.eval()  # no dropout in the statistics
    try:
        inputs = capture_layer_inputs(model, input_ids)
        device = execution_device(model)
        for index, layer in enumerate(layers):
            with visiting([layer], device):  # onloading: this layer on the accelerator
                yield index, layer, inputs
                if index + 1 < len(layers):
                    run_layer(layer, inputs, update=True)
    finally:
        model.config.use_cache = use_cache
        model.train(training)
