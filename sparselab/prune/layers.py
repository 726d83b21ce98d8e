"""Finding the prunable parts of a decoder model: its layers and their linear sub-modules."""
from __future__ import annotations

import torch
from torch import nn

from sparselab.shapes import decoder_layers


def layer_index(name: str) -> int:
    """The decoder-layer index of a `prunable_linears` name ('model.layers.3.mlp.up_proj' -> 3)."""
    parts = name.split(".")
    try:
        return int(parts[parts.index("layers") + 1])
    except (ValueError, IndexError):
        raise ValueError(f"'{name}' is not the name of a module inside a decoder layer") from None


def linear_shapes(model_config) -> dict[str, tuple[int, int]] | None:
    """(out, in) of each linear of a Llama-family decoder layer, from the model config alone;
    None when the config does not say (then shape checks wait for the weights)."""
    try:
        hidden, inter = model_config.hidden_size, model_config.intermediate_size
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    except AttributeError:
        return None
    return {"self_attn.q_proj": (heads * head_dim, hidden),
            "self_attn.k_proj": (kv_heads * head_dim, hidden),
            "self_attn.v_proj": (kv_heads * head_dim, hidden),
            "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def linear_modules(module: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of a module by name; inside a peft wrapper, the base layers under their
    original names (LoRA's own A/B matrices are not model weights)."""
    return {name.removesuffix(".base_layer"): sub for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and ".lora_" not in name}


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, by full name (embeddings and lm_head excluded)."""
    out = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in linear_modules(layer).items():
            out[f"model.layers.{index}.{name}"] = linear
    return out


def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight change each unmerged peft adapter adds to a prunable linear, by the linear's
    name: what merging would add (`get_delta_weight` of every active adapter)."""
    deltas = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, sub in layer.named_modules():
            if not hasattr(sub, "get_delta_weight") or getattr(sub, "merged", False):
                continue
            active = [a for a in sub.active_adapters if a in getattr(sub, "lora_A", {})]
            if active:
                deltas[f"model.layers.{index}.{name}"] = sum(sub.get_delta_weight(a)
                                                             for a in active)
    return deltas


@torch.no_grad()
def sparsity_report(model: nn.Module) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Achieved sparsity per prunable layer and overall (`sparsity.linear`, `params.*`).

    `sparsity.emptied_inputs` is the share of the linears' input columns whose weights are all
    zero (an input the layer no longer reads: what ranking blocks across a whole matrix does to
    low-activation inputs), overall and per kind of linear (`sparsity.emptied_inputs.down_proj`).

    With unmerged adapters `sparsity.linear` is the frozen base's; `sparsity.effective` counts
    the zeros of base + adapter, the weights the model computes with (over all prunable
    linears), and `sparsity.effective_adapted` over the adapted linears alone."""
    per_layer = {}
    zeros = total = 0
    emptied: dict[str, list[int]] = {}  # kind of linear -> [emptied input columns, columns]
    deltas = adapter_deltas(model)
    effective_zeros = adapted_zeros = adapted_total = 0
    for name, linear in prunable_linears(model).items():
        n = linear.weight.numel()
        z = int((linear.weight == 0).sum())
        empty = int((linear.weight == 0).all(dim=0).sum())
        per_layer[name] = {"zeros": z, "total": n, "sparsity": z / n,
                           "emptied_inputs": empty / linear.in_features}
        counts = emptied.setdefault(name.rsplit(".", 1)[-1], [0, 0])
        counts[0] += empty
        counts[1] += linear.in_features
        zeros += z
        total += n
        if name in deltas:
            z = int(((linear.weight + deltas[name].to(linear.weight.dtype)) == 0).sum())
            adapted_zeros += z
            adapted_total += n
        effective_zeros += z
    params_total = sum(p.numel() for p in model.parameters())
    params_nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    overall = {"sparsity.linear": zeros / total if total else 0.0,
               "weights.total": float(params_total), "weights.nonzero": float(params_nonzero)}
    if emptied:
        overall["sparsity.emptied_inputs"] = (sum(e for e, _ in emptied.values())
                                              / sum(c for _, c in emptied.values()))
        overall.update({f"sparsity.emptied_inputs.{kind}": e / c
                        for kind, (e, c) in emptied.items()})
    if deltas:
        overall["sparsity.effective"] = effective_zeros / total
        overall["sparsity.effective_adapted"] = adapted_zeros / adapted_total
    return per_layer, overall
