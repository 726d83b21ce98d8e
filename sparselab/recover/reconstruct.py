"""Reconstruction: each decoder layer's attention and MLP parts refit, one at a time, to the dense
model's outputs on calibration text; masks fixed (Wagner, Roux, Zimmer & Pokutta, "A Free Lunch in
LLM Compression: Revisiting Retraining after Pruning", arXiv 2510.14444, ZIB-IOL reference code).

```yaml
recover:
  method: reconstruct
  data: wikitext2                # or squad, gsm8k, a mix: windows of train.seqlen tokens
  train: {samples: 128, seqlen: 512, epochs: 1, batch_size: 4, lr: 1.0e-5, warmup_steps: 10,
          schedule: linear, weight_decay: 0.0, precision: fp32}
```
The attention part of a Llama-family decoder layer is input_layernorm -> self_attn -> + residual, the
MLP part post_attention_layernorm -> mlp -> + residual (the reference's "block size 1/2"). Layer by
layer, attention first: the part's input is the dense model's activation there and its target the
dense part's output on it (the reference's released sweep: no sparse propagation, dense targets),
so every part is fitted on its own and only one layer's weights train at a time. The loss is the
mean squared error over tokens and hidden units; AdamW with `train.lr`, `train.schedule` and
`train.warmup_steps`, `train.epochs` passes over `train.samples` windows in `train.batch_size`
batches, no gradient clipping (as in the reference). Only the kept weights of the part's linears
train: gradients of pruned weights are zeroed and the masks re-applied after every step, so the
sparsity is exactly the pruned model's (checked at the end). Norms stay as pruned (the reference
also trains the norm weights); the part trains in float32 whatever the model's dtype.

Where sparselab differs: the masks come from the prune stage and stay fixed (the reference prunes
and reconstructs each part in one pass, so a later part's masks are chosen after the earlier parts
were refit). Metrics: `recover.reconstruct.mse_before` / `_after` (each part's output error on the
calibration windows, averaged over the parts), per part in artifacts/reconstruction.csv.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from sparselab import progress
from sparselab.matrix import Calibration
from sparselab.memory import PeakMemory
from sparselab.models import LoadedModel
from sparselab.prune.layers import linear_modules
from sparselab.recover.base import RecoverContext, RecoveryMethod
from sparselab.shapes import decoder_layers

PARTS = ("attention", "mlp")


def attention_part(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    return x + (out[0] if isinstance(out, (tuple, list)) else out)


def mlp_part(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return x + layer.mlp(layer.post_attention_layernorm(x))


def part_function(part: str):
    return attention_part if part == "attention" else mlp_part


def part_module(layer: nn.Module, part: str) -> nn.Module:
    return layer.self_attn if part == "attention" else layer.mlp


def check_layout(model: nn.Module) -> None:
    """Refuse a decoder layer that is not input_layernorm/self_attn/post_attention_layernorm/mlp."""
    needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    layer = decoder_layers(model)[0]
    missing = [name for name in needed if not hasattr(layer, name)]
    if missing:
        raise ValueError(f"recover.method reconstruct splits Llama-family decoder layers into "
                         f"attention and MLP parts; {type(layer).__name__} has no "
                         f"{', '.join(missing)}. Use recover.method lora or dense.")


@torch.no_grad()
def apply(function, layer: nn.Module, inputs: torch.Tensor, kwargs: dict,
          batch_size: int) -> torch.Tensor:
    """`function(layer, x)` over the samples of `inputs` in batches, float32 out."""
    dtype = next(layer.parameters()).dtype
    outs = [function(layer, inputs[i:i + batch_size].to(dtype), kwargs).float()
            for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(outs)


def output_error(function, layer, inputs, targets, kwargs, batch_size: int) -> float:
    """Mean squared error of the part's outputs against the targets, over every value."""
    return float(((apply(function, layer, inputs, kwargs, batch_size) - targets) ** 2).mean())


def fit_part(layer: nn.Module, part: str, inputs: torch.Tensor, targets: torch.Tensor,
             kwargs: dict, cfg, generator: torch.Generator) -> int:
    """Train the kept weights of one part's linears so the part maps `inputs` to `targets`;
    returns the number of optimizer steps."""
    from transformers import get_scheduler

    from sparselab.recover.training import TrainingDiverged, autocast
    function = part_function(part)
    linears = linear_modules(part_module(layer, part))
    kept = {name: linear.weight != 0 for name, linear in linears.items()}
    params = [linear.weight for linear in linears.values()]
    for param in params:
        param.requires_grad_(True)
    per_epoch = math.ceil(inputs.shape[0] / cfg.batch_size)
    steps = cfg.max_steps or per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=steps)
    order = torch.randperm(inputs.shape[0], generator=generator)
    for step in range(steps):
        if step and step % per_epoch == 0:
            order = torch.randperm(inputs.shape[0], generator=generator)
        index = order[(step % per_epoch) * cfg.batch_size:][:cfg.batch_size]
        with autocast(cfg.precision):
            out = function(layer, inputs[index], kwargs)
        loss = torch.nn.functional.mse_loss(out.float(), targets[index])
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"reconstruction loss became {loss.item()} at step {step}; "
                                   f"nothing was saved. Try a lower recover.train.lr (now "
                                   f"{cfg.lr:g}).")
        loss.backward()
        for name, linear in linears.items():
            linear.weight.grad.mul_(kept[name])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.mul_(kept[name])
    for param in params:
        param.requires_grad_(False)
    return steps


class ReconstructRecovery(RecoveryMethod):
    needs_pruned_parent = True
    onloads = True  # layer by layer: the pair of layers being fitted visits the accelerator

    def check(self, config, linear_names=None) -> None:
        train = config.train
        if train.optimizer != "adamw" or train.gradient_checkpointing:
            raise ValueError("recover.method reconstruct fits one part of one layer at a time "
                             "with AdamW (its memory is that part's); recover.train.optimizer "
                             "and gradient_checkpointing apply to lora and dense recovery.")

    def memory(self, config, m):
        """The pruned and the dense model (onloaded: the pair of layers being fitted, the pruned
        one in float32); every sample's part inputs and dense targets in float32, plus one more
        such tensor while `apply` gathers a part's outputs; AdamW on the MLP part's weights (the
        larger part) with their masks; one batch's saved activations."""
        from sparselab.footprint import Need, saved_per_token
        s, cfg = m.shape, config.train
        layer_float = s.layer_params * (4 - m.bytes)
        models = (s.layer_params * (4 + m.bytes) if m.onload
                  else 2 * m.weights + layer_float)
        mlp = 3 * s.hidden * s.intermediate
        return Need.of({
            "models": models,
            "activations": 3 * cfg.samples * cfg.seqlen * s.hidden * 4,
            "AdamW on a part": mlp * (3 * 4 + 1),
            "backward": cfg.batch_size * cfg.seqlen * saved_per_token(m, "fp32", {}, True)},
            2 * m.weights if m.onload else 0)

    def recover(self, loaded: LoadedModel, ctx: RecoverContext) -> tuple[LoadedModel, dict]:
        from sparselab.onload import execution_device, visiting
        from sparselab.prune.calibration import calibration_set
        from sparselab.prune.walk import capture_layer_inputs
        if ctx.dense is None:
            raise ValueError("recover.method reconstruct needs the dense model of the cell; it "
                             "runs inside `sparselab run` only.")
        cfg = ctx.config.train
        model = loaded.model
        check_layout(model)
        calib = calibration_set(loaded.tokenizer, Calibration(data=ctx.config.data,
                                                              samples=cfg.samples,
                                                              seqlen=cfg.seqlen), ctx.source,
                                seed=cfg.seed)
        ctx.log.info("reconstruct: %d x %d tokens from %s", calib.samples, calib.seqlen,
                     calib.fingerprint["data"])
        dense = ctx.dense().model.eval()
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        pruned = {name: linear.weight == 0 for name, linear in linear_modules(model).items()}
        generator = torch.Generator().manual_seed(cfg.seed or 0)
        captured = capture_layer_inputs(dense, calib.input_ids)
        device = execution_device(model)  # the accelerator, also when onloading
        # batches are drawn at random from every sample: the activations stay on the device
        inputs, kwargs = captured.hidden.to(device).float(), captured.kwargs
        del captured
        layers, dense_layers = decoder_layers(model), decoder_layers(dense)
        rows, steps = ["layer,part,mse_before,mse_after"], 0
        before, after = [], []
        start = time.perf_counter()
        with PeakMemory(device) as memory:
            for index, (layer, dense_layer) in enumerate(zip(layers, dense_layers)):
                progress.report(index, len(layers), "layers")
                dtype = next(layer.parameters()).dtype
                with visiting([layer, dense_layer], device):  # onloading: this pair only
                    layer.float()
                    for part in PARTS:
                        function = part_function(part)
                        targets = apply(function, dense_layer, inputs, kwargs, cfg.batch_size)
                        error = output_error(function, layer, inputs, targets, kwargs,
                                             cfg.batch_size)
                        steps += fit_part(layer, part, inputs, targets, kwargs, cfg, generator)
                        fitted = output_error(function, layer, inputs, targets, kwargs,
                                              cfg.batch_size)
                        rows.append(f"{index},{part},{error:.6g},{fitted:.6g}")
                        before.append(error)
                        after.append(fitted)
                        inputs = targets  # the next part's input: the dense activation there
                    layer.to(dtype)
        elapsed = time.perf_counter() - start
        del dense
        revived = [name for name, linear in linear_modules(model).items()
                   if bool((linear.weight[pruned[name]] != 0).any())]
        if revived:
            raise RuntimeError(f"reconstruction revived pruned weights in {revived[:3]}")
        ctx.artifacts.mkdir(parents=True, exist_ok=True)
        (ctx.artifacts / "reconstruction.csv").write_text("\n".join(rows) + "\n")
        return loaded, {"recover.reconstruct.mse_before": sum(before) / len(before),
                        "recover.reconstruct.mse_after": sum(after) / len(after),
                        "recover.sparsity_preserved": 1.0, "train.steps": float(steps),
                        "train.steps_per_s": steps / elapsed if elapsed > 0 else 0.0,
                        "train.peak_memory_mb": memory.peak_bytes / 2**20}
