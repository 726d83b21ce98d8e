"""How much each decoder layer matters, measured on calibration text (for per-layer pruning ratios).

- `removal`: the rise of the mean next-token loss (nats per token, i.e. log of the perplexity ratio)
  on the calibration samples when the layer is skipped (its input passed straight on), the other
  layers intact. The full model's hidden states at every layer boundary are computed once; skipping
  layer i then re-runs only layers i+1.. (about half the work of L full forward passes).
- `cosine`: 1 - cos(layer input, layer output) per token, averaged over every calibration token
  (ShortGPT's "block influence"): a layer that barely turns its input matters little.

The analysis of a model is cached in the stage store (`stages/layer_importance/<key>/`), keyed by
the model's stage key, the metric and the calibration settings, so every cell that prunes the same
model with the same calibration shares one analysis. Its `layer_importance.json`:

```json
{"format": "sparselab-layer-importance", "version": 1, "metric": "removal", "num_layers": 30,
 "importance": [...], "details": {"base_loss": 2.9, "loss": [...], "ppl": [...]},
 "calibration": {...}}
```
can be given back as `options.layer_importance: path/to/layer_importance.json` to reuse it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparselab.prune.gqa_structured.config import LAYER_IMPORTANCE_METRICS as METRICS
from sparselab.onload import execution_device, visiting
from sparselab.prune.walk import capture_layer_inputs, sample_outputs
from sparselab.shapes import base_model, decoder_layers

STAGE = "layer_importance"
FILE = "layer_importance.json"
FORMAT = "sparselab-layer-importance"


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
         device: torch.device) -> torch.Tensor:
    """One decoder layer on every sample, into a new tensor where `hidden` is (the host, under
    onloading, with the layer visiting the accelerator meanwhile)."""
    out = torch.empty_like(hidden)
    with visiting([layer], device):
        for index, result in sample_outputs(layer, hidden, kwargs):
            out[index] = result
    return out


def _head_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
              device: torch.device) -> tuple[float, int]:
    """Summed next-token loss of the final norm + LM head on the last hidden states."""
    base = base_model(model)
    norm, head = base.model.norm, base.get_output_embeddings()
    total, count = 0.0, 0
    with visiting([norm, head], device):
        for index in range(hidden.shape[0]):
            logits = head(norm(hidden[index:index + 1].to(device)))[0, :-1].float()
            labels = input_ids[index, 1:].to(device)
            total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += labels.numel()
    return total, count


@torch.no_grad()
def boundary_states(model: nn.Module, input_ids: torch.Tensor
                    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Hidden states at every layer boundary: [input of layer 0, output of layer 0, ...]."""
    device = execution_device(model)
    inputs = capture_layer_inputs(model, input_ids)
    states = [inputs.hidden]
    for layer in decoder_layers(model):
        states.append(_run(layer, states[-1], inputs.kwargs, device))
    return states, inputs.kwargs


@torch.no_grad()
def removal_importance(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    layers = decoder_layers(model)
    device = execution_device(model)
    states, kwargs = boundary_states(model, input_ids)
    nll, count = _head_nll(model, states[-1], input_ids, device)
    base_loss = nll / count
    losses = []
    for skipped in range(len(layers)):
        hidden = states[skipped]
        for after in range(skipped + 1, len(layers)):
            hidden = _run(layers[after], hidden, kwargs, device)
        nll, _ = _head_nll(model, hidden, input_ids, device)
        losses.append(nll / count)
    return {"importance": [loss - base_loss for loss in losses],
            "details": {"base_loss": base_loss, "base_ppl": math.exp(base_loss), "loss": losses,
                        "ppl": [math.exp(min(loss, 700.0)) for loss in losses],
                        "tokens": count,
                        "definition": "mean next-token loss with the layer skipped minus the "
                                      "full model's (nats/token)"}}


@torch.no_grad()
def cosine_importance(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    device = execution_device(model)
    inputs = capture_layer_inputs(model, input_ids)
    hidden, values = inputs.hidden, []
    for layer in decoder_layers(model):
        out = _run(layer, hidden, inputs.kwargs, device)
        distance = [1.0 - nn.functional.cosine_similarity(hidden[index].float(),
                                                          out[index].float(), dim=-1)
                    for index in range(hidden.shape[0])]
        values.append(float(torch.cat(distance).mean()))
        hidden = out
    return {"importance": values,
            "details": {"tokens": int(input_ids.numel()),
                        "definition": "1 - cos(layer input, layer output), mean over tokens"}}


def analyse(model: nn.Module, input_ids: torch.Tensor, metric: str) -> dict[str, Any]:
    """The layer importance of `model` by `metric` on calibration `input_ids` (no caching)."""
    if metric not in METRICS:
        raise ValueError(f"unknown layer-importance metric '{metric}' "
                         f"(valid: {', '.join(METRICS)})")
    base = base_model(model)
    use_cache, training = getattr(base.config, "use_cache", None), base.training
    base.config.use_cache = False
    base.eval()
    try:
        result = (removal_importance if metric == "removal" else cosine_importance)(
            base, input_ids)
    finally:
        base.config.use_cache = use_cache
        base.train(training)
    return {"format": FORMAT, "version": 1, "metric": metric,
            "num_layers": len(result["importance"]), **result}


def cache_key(model_key: str, metric: str, calibration: dict[str, Any]) -> str:
    from sparselab.matrix import config_hash
    return config_hash({"model": model_key, "metric": metric, "calibration": calibration})


def cached(cache, model_key: str, metric: str, calibration: dict[str, Any],
           compute: Callable[[], dict[str, Any]], log=None,
           model_code: str | None = None) -> tuple[dict[str, Any], bool]:
    """The analysis from the stage cache, or computed (under the key's lock) and stored.
    Returns (analysis, whether it came from the cache). Without a cache or a model key: computed.
    An entry made by other code, or from a model made by other code (`model_code`, its lineage),
    is not served."""
    if cache is None or not model_key:
        return compute(), False
    from sparselab.provenance import StageCode
    key = cache_key(model_key, metric, calibration)
    code = StageCode.of([__name__], model_code)
    entry = cache.entry(STAGE, key, code=code)
    if entry is None:
        with cache.lock(STAGE, key):
            entry = cache.entry(STAGE, key, code=code)
            if entry is None:
                if log is not None:
                    log.info("layer importance (%s): computing, key %s", metric, key)
                result = compute()
                result = {**result, "model_key": model_key, "calibration": calibration}
                meta = {"label": f"layer importance {metric}", "model": model_key,
                        "metric": metric, "calibration": calibration, "code": code.record()}
                with cache.writing(STAGE, key, meta) as out:
                    (out / FILE).write_text(json.dumps(result, indent=1) + "\n")
                return result, False
    if log is not None:
        log.info("layer importance (%s): cache hit %s", metric, key)
    return read_file(entry.path / FILE), True


def read_file(path: str | Path) -> dict[str, Any]:
    """A layer_importance.json, checked for shape (not yet against a model)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"layer importance file '{path}' not found (give the path of a "
                         "layer_importance.json written by an earlier gqa_structured run, or "
                         "removal | cosine)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"layer importance file '{path}' is not valid JSON ({exc})") from None
    values = data.get("importance") if isinstance(data, dict) else None
    if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values):
        raise ValueError(f"layer importance file '{path}' needs a non-empty list of finite "
                         "numbers under 'importance'")
    declared = data.get("num_layers", len(values))
    if declared != len(values):
        raise ValueError(f"layer importance file '{path}': num_layers {declared} but "
                         f"{len(values)} importance values")
    return {**data, "num_layers": len(values)}
