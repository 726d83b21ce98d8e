"""Per-layer shapes of structurally pruned Llama-family models: slicing, saving, loading.

Structured pruning (`gqa_structured`) leaves every decoder layer with its own number of attention
heads and MLP channels, while the model's config still describes the original, uniform model
(head_dim, the Q:KV ratio `num_attention_heads // num_key_value_heads` and hidden size are
unchanged; transformers' LlamaAttention reshapes with -1 and head_dim, so fewer heads just work).

A model whose layers differ from its config is saved with a `sparselab_shapes.json` beside its
weights (written by `sparselab.models.save_model`):

```json
{"format": "sparselab-shapes", "version": 1, "head_dim": 64,
 "layers": [{"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1152}, ...]}
```
and `sparselab.models.load_model` builds the model from its config, gives each layer those shapes,
then reads the weights (bit-identical to the saved ones). Plain `from_pretrained` refuses such a
folder (the weight shapes do not match the config), which is the intended failure.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHAPES_FILE = "sparselab_shapes.json"
FORMAT = "sparselab-shapes"
VERSION = 1
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def base_linear(module: nn.Module) -> nn.Module:
    """The plain nn.Linear inside a peft LoRA wrapper (or the module itself)."""
    return getattr(module, "base_layer", module)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a Llama-family model (`model.model.layers`); a peft model
    is looked through to its base model."""
    model = base_model(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `model.layers` stack; sparselab prunes "
                         "decoder models of the Llama family.")
    return layers


def head_dim(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def has_gqa_modules(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    return attn is not None and all(isinstance(base_linear(getattr(attn, n, None) or nn.Identity()),
                                               nn.Linear) for n in ATTENTION)


def has_gated_mlp(layer: nn.Module) -> bool:
    mlp = getattr(layer, "mlp", None)
    return mlp is not None and all(isinstance(base_linear(getattr(mlp, n, None) or nn.Identity()),
                                              nn.Linear) for n in MLP)


def layer_shape(layer: nn.Module, hd: int) -> dict[str, int]:
    """The head counts and intermediate size of one decoder layer, read from its weights."""
    out: dict[str, int] = {}
    if has_gqa_modules(layer):
        attn = layer.self_attn
        out["num_attention_heads"] = base_linear(attn.q_proj).out_features // hd
        out["num_key_value_heads"] = base_linear(attn.k_proj).out_features // hd
    if has_gated_mlp(layer):
        out["intermediate_size"] = base_linear(layer.mlp.up_proj).out_features
    return out


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    hd = head_dim(model)
    return [layer_shape(layer, hd) for layer in decoder_layers(model)]


def config_shape(config) -> dict[str, int]:
    return {"num_attention_heads": int(config.num_attention_heads),
            "num_key_value_heads": int(getattr(config, "num_key_value_heads", None)
                                       or config.num_attention_heads),
            "intermediate_size": int(config.intermediate_size)}


def is_reshaped(model: nn.Module) -> bool:
    """True when some decoder layer's shape differs from what the config says."""
    base = base_model(model)
    try:
        uniform = config_shape(base.config)
        shapes = layer_shapes(base)
    except (AttributeError, ValueError, TypeError):  # not a Llama-style decoder: nothing to record
        return False
    return any(any(shape.get(k, v) != v for k, v in uniform.items()) for shape in shapes)


# --- slicing ------------------------------------------------------------------------------------

def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding the given output rows / input columns of `linear` (copied)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0],
                             bias=linear.bias is not None, device=weight.device,
                             dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, rows.to(bias.device)) if rows is not None
                           else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    new.train(linear.training)
    return new


def group_rows(groups: list[int] | torch.Tensor, hd: int, heads_per_group: int) -> torch.Tensor:
    """Row indices of q_proj (or columns of o_proj) belonging to whole KV groups, in order:
    group g owns query heads g*heads_per_group ... (g+1)*heads_per_group - 1 (repeat_kv's
    layout)."""
    groups = torch.as_tensor(groups, dtype=torch.long)
    heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group)[None, :]).reshape(-1)
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def kv_rows(groups: list[int] | torch.Tensor, hd: int) -> torch.Tensor:
    return group_rows(groups, hd, 1)


def keep_attention_groups(layer: nn.Module, keep: list[int], hd: int, heads_per_group: int) -> None:
    """Keep only the KV groups `keep` (sorted indices) of a layer's attention: q/k/v rows and
    o_proj columns are sliced; head_dim and the Q:KV ratio stay."""
    if not keep:
        raise ValueError("a layer must keep at least one attention group")
    attn = layer.self_attn
    q = group_rows(sorted(keep), hd, heads_per_group)
    kv = kv_rows(sorted(keep), hd)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q)


def keep_mlp_channels(layer: nn.Module, keep: list[int]) -> None:
    """Keep only the intermediate channels `keep`: gate/up rows and down_proj columns."""
    if not keep:
        raise ValueError("a layer must keep at least one MLP channel")
    mlp = layer.mlp
    index = torch.as_tensor(sorted(keep), dtype=torch.long)
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=index)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=index)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=index)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


# --- building a model with given shapes ---------------------------------------------------------

def _empty_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=like.bias is not None,
                              device=like.weight.device, dtype=like.weight.dtype)


def apply_shapes(model: nn.Module, shapes: list[dict[str, int]], hd: int) -> None:
    """Give each decoder layer of a freshly built model the recorded shape (uninitialised weights,
    to be overwritten by the saved ones)."""
    layers = decoder_layers(model)
    if len(shapes) != len(layers):
        raise ValueError(f"the shape file lists {len(shapes)} layers, the model has {len(layers)}")
    for layer, shape in zip(layers, shapes):
        if "num_attention_heads" in shape:
            attn = layer.self_attn
            q_out = shape["num_attention_heads"] * hd
            kv_out = shape["num_key_value_heads"] * hd
            hidden = attn.q_proj.in_features
            attn.q_proj = _empty_linear(attn.q_proj, hidden, q_out)
            attn.k_proj = _empty_linear(attn.k_proj, hidden, kv_out)
            attn.v_proj = _empty_linear(attn.v_proj, hidden, kv_out)
            attn.o_proj = _empty_linear(attn.o_proj, q_out, attn.o_proj.out_features)
        if "intermediate_size" in shape:
            mlp = layer.mlp
            size = shape["intermediate_size"]
            hidden = mlp.up_proj.in_features
            mlp.gate_proj = _empty_linear(mlp.gate_proj, hidden, size)
            mlp.up_proj = _empty_linear(mlp.up_proj, hidden, size)
            mlp.down_proj = _empty_linear(mlp.down_proj, size, mlp.down_proj.out_features)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = size


def save_shapes(model: nn.Module, folder: Path) -> bool:
    """Write `sparselab_shapes.json` into `folder` when the model's layers differ from its config
    (remove a stale one otherwise). Returns whether a file was written."""
    folder = Path(folder)
    file = folder / SHAPES_FILE
    base = base_model(model)
    if not is_reshaped(base):
        if file.is_file():
            file.unlink()
        return False
    folder.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, "head_dim": head_dim(base),
            "layers": layer_shapes(base)}
    file.write_text(json.dumps(data, indent=1) + "\n")
    return True


def read_shapes(folder: Path) -> dict[str, Any] | None:
    file = Path(folder) / SHAPES_FILE
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"{file}: not a sparselab shape file of version {VERSION}")
    return data


def _state_dict_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    raise FileNotFoundError(f"{folder}: no model.safetensors (or its index) to read weights from")


def load_shaped(folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model saved in `folder` with per-layer shapes, or None when it has no shape file."""
    folder = Path(folder)
    data = read_shapes(folder)
    if data is None:
        return None
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    hd = head_dim(config)
    if int(data["head_dim"]) != hd:
        raise ValueError(f"{folder / SHAPES_FILE}: head_dim {data['head_dim']} does not match the "
                         f"config's {hd}")
    apply_shapes(model, data["layers"], hd)
    state: dict[str, torch.Tensor] = {}
    for file in _state_dict_files(folder):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{folder}: weights the model does not have: {sorted(unexpected)[:5]}")
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    untied = [k for k in missing if not (k in tied and k in params and tied[k] in params
                                         and params[k] is params[tied[k]])]
    if untied:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {untied[:5]}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model
