"""Onloading (`sparselab run --onload`): the weights stay in host memory and each decoder layer,
and the embedding, final norm and head, visit the accelerator only while they compute.

A model larger than the accelerator then prunes and evaluates with the same results: the same
modules run the same operations on the same device, only the weights travel (host -> device before
a module's forward, back after). The memory plan (sparselab.footprint) counts one layer's weights
on the accelerator instead of the model's. Where it applies:

- the layer-wise pruning walk (sparselab.prune.walk): the embedding while the first layer's
  inputs are caught, then each decoder layer for its statistics, pruning and forward; the
  calibration activations stay on the host too, one sample visiting at a time;
- magnitude pruning: each decoder layer for its masks;
- structured pruning's layer importance (sparselab.prune.layer_importance): the same walk, and
  the layers after a skipped one again;
- the reconstruction recovery: the pair of layers (pruned, dense) being fitted;
- whole-model forwards without gradients (perplexity, answer losses, lm-eval tasks): `streamed`
  hooks move each module for its forward.
Stages that train (LoRA, dense recovery) or take gradients (Taylor scores of structured pruning,
for that phase only) run with the whole model on the accelerator (`placed`): the plan counts
them so.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparselab.shapes import base_model, decoder_layers

HOST = "cpu"


def onloading() -> bool:
    """Whether this run keeps the weights on the host (`--onload`, $SPARSELAB_ONLOAD=1)."""
    return os.environ.get("SPARSELAB_ONLOAD") == "1"


def weights_device() -> str:
    """Where a loaded model's weights are kept: the host when onloading, else where it runs."""
    from sparselab.models import compute_device
    return HOST if onloading() else compute_device()


def execution_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the accelerator when onloading, else where its weights are."""
    if onloading():
        from sparselab.models import compute_device
        return torch.device(compute_device())
    return next(model.parameters()).device


def outer_modules(model: nn.Module) -> list[nn.Module]:
    """The modules outside the decoder layers: the inner model's other children (embedding,
    rotary embedding, final norm) and the output head."""
    base = base_model(model)
    layers = decoder_layers(model)
    inner = [m for m in base.model.children() if m is not layers]
    head = base.get_output_embeddings()
    return inner + ([head] if head is not None else [])


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@contextmanager
def visiting(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Under onloading, `modules` on `device` inside the block and back on the host after (also
    on error); otherwise they stay where they are."""
    if not onloading():
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to(HOST)


@contextmanager
def streamed(model: nn.Module) -> Iterator[torch.device]:
    """Under onloading, hooks move each decoder layer and each outer module to the accelerator
    for its forward (with the tensors handed to it) and back after; yields the device inputs
    should be put on. Without onloading: nothing changes."""
    device = execution_device(model)
    if not onloading():
        yield device
        return

    def before(module, args, kwargs):
        module.to(device)
        return _to(args, device), _to(kwargs, device)

    def after(module, _args, _output):
        module.to(HOST)

    units = [*outer_modules(model), *decoder_layers(model)]
    handles = [h for unit in units for h in (
        unit.register_forward_pre_hook(before, with_kwargs=True),
        unit.register_forward_hook(after))]
    try:
        yield device
    finally:
        for handle in handles:
            handle.remove()
        model.to(HOST)


@contextmanager
def placed(model: nn.Module, whole: bool) -> Iterator[None]:
    """For a stage that cannot onload (`whole`): under onloading the whole model moves to the
    accelerator for the stage and back to the host after; otherwise nothing changes."""
    if not (whole and onloading()):
        yield
        return
    from sparselab.models import compute_device
    model.to(compute_device())
    try:
        yield
    finally:
        model.to(HOST)
