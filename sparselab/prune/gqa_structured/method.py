"""GQA-aware structured pruning: whole attention groups and MLP channels go; the model shrinks.

```yaml
prune:
  method: gqa_structured
  sparsity: 0.25               # the ratio: share of the prunable parameters to remove
  pattern: unstructured        # structured pruning has no pattern; any other is refused
  calibration: {data: wikitext2, samples: 16, seqlen: 256}
  options:
    attention: true            # prune attention groups (one KV head + the query heads sharing it)
    mlp: true                  # prune MLP intermediate channels (gate/up rows + down columns)
    importance: taylor         # taylor (|w * dL/dw| summed over the group) | magnitude (L2)
    layer_importance: removal  # removal | cosine | path/to/layer_importance.json
    strategy: uniform          # uniform | inverse | linear
    layer_range: null          # [start, end): only layers start..end-1 are pruned (all if null)
    spread: 0.5                # linear: ratios from (1-spread)*r at the first layer to (1+spread)*r
```

**What is pruned.** The prunable parameters are the enabled components (`attention`: q/k/v/o_proj;
`mlp`: gate/up/down_proj) of the decoder layers in `layer_range`; `sparsity` is the share of them
removed. Attention is pruned in whole KV groups: KV head j together with the query heads
j*g .. j*g+g-1 that read it (g = num_attention_heads / num_key_value_heads, repeat_kv's layout), so
every layer keeps the model's Q:KV ratio; their q/k/v rows and o_proj columns are sliced out and
head_dim stays. The MLP loses intermediate channels (gate/up rows with the matching down columns).
The weights really shrink; the per-layer shapes are saved beside the weights
(`sparselab_shapes.json`, see `sparselab.shapes`) and `sparselab.load_model` reads them back.

**Which groups / channels.** `taylor`: sum over the unit's weights of |w * dL/dw|, with dL/dw the
LM-loss gradient accumulated over the calibration samples on the dense model (LLM-Pruner's
first-order element-wise importance). `magnitude`: the L2 norm of the unit's weights. The lowest
scored units of each layer go.

**How much per layer.** The layer importance (`sparselab.prune.layer_importance`: `removal` = loss
rise when the layer is skipped, `cosine` = 1 - cos(input, output)) sets per-layer ratios r_i whose
mean over the layers in range is the target:
- `uniform`: r_i = target (the importance only breaks rounding ties: the less important layer gives
  the extra group);
- `inverse`: r_i proportional to 1/importance (importance floored at 1% of its mean), so important
  layers are pruned less;
- `linear`: r_i grows linearly with depth from (1-spread)*target to (1+spread)*target (LLM-Pruner's
  observation that early layers matter more; it keeps the first/last layers by `layer_range`).
Ratios are capped so that every layer keeps at least one attention group and one MLP channel; what a
capped layer cannot give is spread over the others in proportion to their ratios (the mean stays the
target). `uniform` has nowhere to spread: a target above a layer's cap is refused. Removal counts
are then rounded by largest remainder over the layers, so the total removed is the requested share
within one group (and one channel).

Artifacts: `layer_importance.json`, `pruning_strategy.png` (importance and ratio per layer),
`pruned_params.csv` (parameters and shapes per layer before/after).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparselab import shapes as sh
from sparselab.models import LoadedModel
from sparselab.onload import placed
from sparselab.prune import layer_importance as li
from sparselab.prune.base import PruneContext, PruningMethod
from sparselab.prune.gqa_structured.config import GQAOptions
from sparselab.shapes import decoder_layers


def raw_ratios(importance: list[float], target: float, strategy: str, layers: list[int],
               spread: float = 0.5) -> dict[int, float]:
    """Uncapped per-layer ratios of the layers in range; their mean is `target`."""
    n = len(layers)
    if strategy == "uniform" or n == 1:
        return {i: target for i in layers}
    if strategy == "linear":
        return {i: target * (1.0 + spread * (2.0 * pos / (n - 1) - 1.0))
                for pos, i in enumerate(layers)}
    if strategy == "inverse":
        values = [importance[i] for i in layers]
        positive = [max(v, 0.0) for v in values]
        mean = sum(positive) / n
        if mean <= 0:
            return {i: target for i in layers}
        floor = 0.01 * mean
        weights = [1.0 / max(v, floor) for v in values]
        scale = target * n / sum(weights)
        return {i: w * scale for i, w in zip(layers, weights)}
    raise ValueError(f"unknown strategy '{strategy}' (valid: uniform, inverse, linear)")


def cap_ratios(ratios: dict[int, float], caps: dict[int, float], target: float,
               strategy: str, why: dict[int, str] | None = None) -> dict[int, float]:
    """Cap each layer's ratio; spread the excess over the uncapped layers (mean kept)."""
    why = why or {}
    if strategy == "uniform":
        for i, r in ratios.items():
            if r > caps[i] + 1e-12:
                raise ValueError(
                    f"ratio {target:g} with strategy uniform would remove every "
                    f"{why.get(i, 'group')} of layer {i} (it can lose at most {caps[i]:.4f}); "
                    "lower prune.sparsity, use strategy inverse or linear, or prune fewer "
                    "components (options.attention / options.mlp).")
        return dict(ratios)
    n = len(ratios)
    if target > sum(caps.values()) / n + 1e-12:
        worst = min(caps, key=caps.get)
        raise ValueError(
            f"ratio {target:g} is more than the layers in range can lose while each keeps at "
            f"least one {why.get(worst, 'group')} (mean cap {sum(caps.values()) / n:.4f}); lower "
            "prune.sparsity or prune fewer components.")
    out = dict(ratios)
    fixed: set[int] = set()
    for _ in range(n + 1):
        over = [i for i in out if i not in fixed and out[i] > caps[i]]
        if not over:
            break
        for i in over:
            out[i] = caps[i]
            fixed.add(i)
        free = [i for i in out if i not in fixed]
        need = target * n - sum(out[i] for i in fixed)
        have = sum(out[i] for i in free)
        if not free:
            break
        if have > 0:
            for i in free:
                out[i] *= need / have
        else:
            for i in free:
                out[i] = need / len(free)
    return out


def allocate(ratios: dict[int, float], units: dict[int, int], importance: list[float]
             ) -> dict[int, int]:
    """Units to remove per layer: floor of ratio*units, the remaining total (rounded half up)
    handed out by largest remainder; ties go to the less important layer."""
    exact = {i: ratios[i] * units[i] for i in ratios}
    counts = {i: min(math.floor(x + 1e-9), units[i]) for i, x in exact.items()}
    total = math.floor(sum(exact.values()) + 0.5)
    short = total - sum(counts.values())
    order = sorted(exact, key=lambda i: (-round(exact[i] - counts[i], 9), importance[i], i))
    for i in order:
        if short <= 0:
            break
        if counts[i] < units[i] - 1 and exact[i] - counts[i] > 1e-9:
            counts[i] += 1
            short -= 1
    return counts


# --- unit scores ---------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    index: int
    groups: int  # KV groups before
    channels: int  # MLP channels before
    ratio: float = 0.0
    remove_groups: int = 0
    remove_channels: int = 0
    kept_groups: list[int] = field(default_factory=list)
    kept_channels: list[int] = field(default_factory=list)


def _attention_parts(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    attn = layer.self_attn
    return tuple(sh.base_linear(getattr(attn, n)).weight for n in sh.ATTENTION)


def _mlp_parts(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    mlp = layer.mlp
    return tuple(sh.base_linear(getattr(mlp, n)).weight for n in sh.MLP)


def group_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, hd: int,
                 g: int) -> torch.Tensor:
    """Per KV group, the sum of an element-wise score over its q/k/v rows and o_proj columns
    (tensors shaped like the weights)."""
    kv = k.shape[0] // hd
    q_rows = q.sum(dim=1).view(kv, g * hd).sum(dim=1)
    o_cols = o.sum(dim=0).view(kv, g * hd).sum(dim=1)
    k_rows = k.sum(dim=1).view(kv, hd).sum(dim=1)
    v_rows = v.sum(dim=1).view(kv, hd).sum(dim=1)
    return q_rows + k_rows + v_rows + o_cols


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return gate.sum(dim=1) + up.sum(dim=1) + down.sum(dim=0)


def magnitude_scores(layer: nn.Module, hd: int, g: int, attention: bool, mlp: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2 norm of each group's / channel's weights."""
    groups = channels = None
    if attention:
        groups = group_scores(*(w.detach().double() ** 2 for w in _attention_parts(layer)),
                              hd, g).sqrt()
    if mlp:
        channels = channel_scores(*(w.detach().double() ** 2 for w in _mlp_parts(layer))).sqrt()
    return groups, channels


def taylor_scores(model: nn.Module, input_ids: torch.Tensor, layers: list[int], hd: int, g: int,
                  attention: bool, mlp: bool) -> dict[int, tuple[torch.Tensor | None,
                                                                 torch.Tensor | None]]:
    """First-order Taylor importance |w * dL/dw| summed over each unit; gradients of the mean LM
    loss accumulated over the calibration samples (one at a time)."""
    stack = decoder_layers(model)
    weights: dict[int, list[torch.Tensor]] = {}
    for i in layers:
        parts = (list(_attention_parts(stack[i])) if attention else []) + \
                (list(_mlp_parts(stack[i])) if mlp else [])
        weights[i] = parts
    targets = {id(w) for parts in weights.values() for w in parts}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    try:
        for p in params:
            p.requires_grad_(id(p) in targets)
            p.grad = None
        model.eval()
        model.config.use_cache = False
        device = next(model.parameters()).device
        with torch.enable_grad():
            for row in input_ids:
                batch = row[None].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
        with torch.no_grad():
            return {i: _products_scores(parts, hd, g, attention, mlp)
                    for i, parts in weights.items()}
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.grad = grad
            p.requires_grad_(flag)
        model.train(training)
        model.config.use_cache = use_cache


def _products_scores(parts: list[torch.Tensor], hd: int, g: int, attention: bool, mlp: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One layer's group and channel scores from |w * dL/dw| (float64); its products are let go
    before the next layer's are made."""
    scores = [(w.detach().double() * w.grad.double()).abs() for w in parts]
    return (group_scores(*scores[:4], hd, g) if attention else None,
            channel_scores(*scores[-3:]) if mlp else None)


def kept_after_removing(scores: torch.Tensor, remove: int) -> list[int]:
    """Sorted indices kept after removing the `remove` lowest scores (ties: lower index goes)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[remove:].tolist())


# --- the method ----------------------------------------------------------------------------------

def _params(linears) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears)


def _layer_params(layer: nn.Module) -> int:
    from sparselab.prune.layers import linear_modules
    return _params(linear_modules(layer).values())


def prunable_params(layer: nn.Module, attention: bool, mlp: bool) -> int:
    """Parameters of the enabled components' projections of one layer."""
    names = [("self_attn", n) for n in sh.ATTENTION if attention] + \
            [("mlp", n) for n in sh.MLP if mlp]
    return _params(sh.base_linear(getattr(getattr(layer, part), n)) for part, n in names)


@dataclass
class ModelFacts:
    """What the method needs to know of the model: from its config (validation) or modules."""
    num_layers: int
    heads_per_group: int
    head_dim: int
    hidden: int
    groups: list[int]  # KV heads per layer
    channels: list[int]  # MLP channels per layer

    @classmethod
    def of_config(cls, config) -> ModelFacts:
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None)
        layers = getattr(config, "num_hidden_layers", None)
        inter = getattr(config, "intermediate_size", None)
        if not (heads and kv and layers and inter) or heads % kv:
            raise ValueError(f"model type '{getattr(config, 'model_type', '?')}' has no "
                             "KV-grouped (Llama-style) attention: gqa_structured needs "
                             "num_attention_heads, num_key_value_heads (dividing it), "
                             "num_hidden_layers and intermediate_size in its config.")
        return cls(layers, heads // kv, sh.head_dim(config), config.hidden_size, [kv] * layers,
                   [inter] * layers)

    @classmethod
    def of_model(cls, model: nn.Module, attention: bool, mlp: bool) -> ModelFacts:
        config = model.config
        facts = cls.of_config(config)
        layers = decoder_layers(model)
        groups, channels = [], []
        for i, layer in enumerate(layers):
            if attention and not sh.has_gqa_modules(layer):
                raise ValueError(f"decoder layer {i} ({type(layer).__name__}) has no "
                                 "q_proj/k_proj/v_proj/o_proj attention: gqa_structured prunes "
                                 "KV-grouped Llama-style attention only.")
            if mlp and not sh.has_gated_mlp(layer):
                raise ValueError(f"decoder layer {i} has no gate_proj/up_proj/down_proj MLP.")
            shape = sh.layer_shape(layer, facts.head_dim)
            if attention and shape["num_attention_heads"] != (
                    shape["num_key_value_heads"] * facts.heads_per_group):
                raise ValueError(f"decoder layer {i} has {shape['num_attention_heads']} query "
                                 f"heads for {shape['num_key_value_heads']} KV heads, not the "
                                 f"model's ratio {facts.heads_per_group}")
            groups.append(shape.get("num_key_value_heads", 0))
            channels.append(shape.get("intermediate_size", 0))
        facts.groups, facts.channels, facts.num_layers = groups, channels, len(layers)
        return facts


class GQAStructuredPruning(PruningMethod):
    Options = GQAOptions
    patterns = ("unstructured",)
    needs_calibration = True
    leaves_zeros = False
    # under --onload the layer importance walks one layer at a time, magnitude scores and the
    # slicing work on the host's weights, and Taylor scores (gradients through the whole model)
    # take the whole model to the accelerator for their backward passes
    onloads = True

    # -- validation (before any model loads) --

    def check(self, config) -> None:
        from sparselab.matrix import parse_pattern
        if parse_pattern(config.pattern)[0] != "unstructured":
            raise ValueError(f"method gqa_structured removes whole attention groups and MLP "
                             f"channels; it takes no sparsity pattern (got pattern "
                             f"'{config.pattern}'; leave it at unstructured).")
        super().check(config)
        if config.sparsity <= 0:
            raise ValueError("prune.sparsity is 0: gqa_structured would remove nothing (give the "
                             "share of parameters to remove, e.g. 0.25, or use method none).")
        if config.layer_ratios != "uniform":
            raise ValueError("gqa_structured sets per-layer ratios itself: use "
                             "options.strategy (uniform | inverse | linear) and "
                             "options.layer_importance, not prune.layer_ratios.")
        if config.skip_layers:
            raise ValueError("gqa_structured: use options.layer_range [start, end) to keep "
                             "layers intact, not prune.skip_layers.")
        options = config.method_options
        if options.layer_importance not in li.METRICS:
            data = li.read_file(options.layer_importance)
            if options.layer_range is not None and options.layer_range[1] > data["num_layers"]:
                raise ValueError(f"layer_range {list(options.layer_range)} lies outside the "
                                 f"{data['num_layers']} layers of the importance file "
                                 f"'{options.layer_importance}'.")

    def check_model(self, config, model_config) -> None:
        """Validation that needs the model's config (its layer count and head counts)."""
        options = config.method_options
        facts = ModelFacts.of_config(model_config)
        self._check_facts(config, options, facts)
        self._ratios(config, options, facts, [0.0] * facts.num_layers)

    def _check_facts(self, config, options: GQAOptions, facts: ModelFacts) -> list[int]:
        start, end = options.layer_range or (0, facts.num_layers)
        if end > facts.num_layers:
            raise ValueError(f"layer_range [{start}, {end}) lies outside the model's "
                             f"{facts.num_layers} decoder layers (end may be at most "
                             f"{facts.num_layers}).")
        if options.attention and facts.heads_per_group == 1:
            raise ValueError("the model has no grouped-query attention (num_key_value_heads == "
                             "num_attention_heads): gqa_structured prunes KV groups; set "
                             "options.attention: false to prune the MLP only.")
        if options.layer_importance not in li.METRICS:
            data = li.read_file(options.layer_importance)
            if data["num_layers"] != facts.num_layers:
                raise ValueError(f"layer importance file '{options.layer_importance}' has "
                                 f"{data['num_layers']} layers, the model {facts.num_layers}.")
        return list(range(start, end))

    def _ratios(self, config, options: GQAOptions, facts: ModelFacts, importance: list[float]
                ) -> dict[int, float]:
        layers = self._check_facts(config, options, facts)
        caps, why = {}, {}
        for i in layers:
            limits = []
            if options.attention:
                limits.append(((facts.groups[i] - 1) / facts.groups[i] if facts.groups[i] else 0.0,
                               f"attention group ({facts.groups[i]} KV heads)"))
            if options.mlp:
                limits.append(((facts.channels[i] - 1) / facts.channels[i]
                               if facts.channels[i] else 0.0,
                               f"MLP channel ({facts.channels[i]} channels)"))
            caps[i], why[i] = min(limits)
        raw = raw_ratios(importance, config.sparsity, options.strategy, layers, options.spread)
        return cap_ratios(raw, caps, config.sparsity, options.strategy, why)

    # -- memory (sparselab.footprint) --

    def memory(self, config, m):
        """The larger of its two phases. The layer importance: `removal` holds the hidden states
        at every layer boundary for every calibration sample and, while it re-runs the layers
        after a skipped one, two more such tensors (`cosine`: a layer's input and output), one
        layer's forward on one sample and one sample's logits with their float32 copy and
        log-softmax; onloaded, the states stay on the host. The unit scores: `taylor` has the
        whole model on the accelerator (also onloaded), the gradients of the pruned linears and
        one sample's backward (the tensors autograd saves, the logits and the loss), then one
        layer's float64 products w x dL/dw; `magnitude` a part's float64 squares (onloaded: on the
        host's weights, nothing on the accelerator). An importance read from a file or the stage
        cache costs nothing, which the plan cannot know: it counts the analysis."""
        from sparselab.footprint import Need, saved_per_token
        s, options = m.shape, config.method_options
        samples, seqlen = config.calibration.samples, config.calibration.seqlen
        start, end = options.layer_range or (0, s.layers)
        attention = sum(o * i for name, (o, i) in s.linears().items()
                        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
        mlp = 3 * s.hidden * s.intermediate
        pruned = (attention if options.attention else 0) + (mlp if options.mlp else 0)
        head = seqlen * s.vocab * (m.bytes + (4 if m.bytes != 4 else 0) + 4)
        copies = {"removal": s.layers + 3, "cosine": 2}.get(options.layer_importance, 0)
        analysis = {"weights": m.resident_weights,
                    "activations": m.activations(samples, seqlen, copies) if copies else 0,
                    "layer work": max(m.layer_forward(seqlen), head) if copies else 0}
        if options.importance == "taylor":
            # per logit at the backward's peak: the logits, their float32 copy (bf16), the
            # log-softmax the loss saved, its gradient, the float32 logits' and (bf16) the
            # logits' gradient
            per_logit = 16 if m.bytes == 4 else m.bytes + 4 + 4 + 4 + 4 + m.bytes
            backward = seqlen * (s.layers * saved_per_token(m, "fp32", {}, True)
                                 + s.vocab * per_logit)
            scores = 8 * pruned + 3 * 8 * s.largest_linear
            scoring = {"weights": m.weights, "gradients": (end - start) * pruned * m.bytes,
                       "backward": max(backward, scores)}
        else:  # onloaded: computed on the host's weights
            scoring = {} if m.onload else {  # a part's squares, one more in the making
                "weights": m.weights, "scores": 8 * (max(attention, mlp) + s.largest_linear)}
        host = m.weights + samples * seqlen * s.hidden * m.bytes * copies if m.onload else 0
        return max(Need.of(analysis, host), Need.of(scoring, host), key=lambda n: n.device)

    # -- pruning --

    def prune(self, loaded: LoadedModel, ctx: PruneContext) -> dict[str, float]:
        config = ctx.config
        options = config.method_options
        model = loaded.model
        facts = ModelFacts.of_model(model, options.attention, options.mlp)
        layers = self._check_facts(config, options, facts)
        self._ratios(config, options, facts, [0.0] * facts.num_layers)  # fail before any work
        stack = decoder_layers(model)

        calib_cache: dict[str, Any] = {}

        def calibration_ids() -> torch.Tensor:
            if "ids" not in calib_cache:
                from sparselab.prune.calibration import calibration_set
                calib = calibration_set(loaded.tokenizer, config.calibration, ctx.source)
                ctx.log.info("calibration: %s, %d x %d tokens, sha256 %s",
                             calib.fingerprint["data"], calib.samples, calib.seqlen,
                             calib.fingerprint["sha256"][:12])
                calib_cache["ids"] = calib.input_ids
                calib_cache["fingerprint"] = calib.fingerprint
            return calib_cache["ids"]

        # 1. layer importance (cached, or from a file)
        if options.layer_importance in li.METRICS:
            metric = options.layer_importance
            calibration = {**config.calibration.model_dump(mode="json"),
                           "source": ctx.source.label}
            analysis, hit = li.cached(ctx.cache, ctx.model_key, metric, calibration,
                                      lambda: li.analyse(model, calibration_ids(), metric),
                                      ctx.log, ctx.model_code)
        else:
            analysis, hit = li.read_file(options.layer_importance), True
            analysis["source_file"] = options.layer_importance
        importance = [float(v) for v in analysis["importance"]]

        # 2. per-layer ratios and removal counts
        ratios = self._ratios(config, options, facts, importance)
        plans = {i: LayerPlan(i, facts.groups[i], facts.channels[i], ratios[i]) for i in layers}
        if options.attention:
            for i, n in allocate(ratios, {i: facts.groups[i] for i in layers},
                                 importance).items():
                plans[i].remove_groups = n
        if options.mlp:
            for i, n in allocate(ratios, {i: facts.channels[i] for i in layers},
                                 importance).items():
                plans[i].remove_channels = n

        # 3. unit scores on the dense model
        hd, g = facts.head_dim, facts.heads_per_group
        if options.importance == "taylor":
            with placed(model, whole=True):
                scores = taylor_scores(model, calibration_ids(), layers, hd, g,
                                       options.attention, options.mlp)
        else:
            scores = {i: magnitude_scores(stack[i], hd, g, options.attention, options.mlp)
                      for i in layers}

        # 4. slice
        before = {i: _layer_params(layer) for i, layer in enumerate(stack)}
        part = {i: prunable_params(layer, options.attention, options.mlp)
                for i, layer in enumerate(stack)}
        prunable = sum(part[i] for i in layers)
        shapes_before = sh.layer_shapes(model)
        total_before = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            for i in layers:
                plan = plans[i]
                group_score, channel_score = scores[i]
                if options.attention and plan.remove_groups:
                    plan.kept_groups = kept_after_removing(group_score, plan.remove_groups)
                    sh.keep_attention_groups(stack[i], plan.kept_groups, hd, g)
                if options.mlp and plan.remove_channels:
                    plan.kept_channels = kept_after_removing(channel_score, plan.remove_channels)
                    sh.keep_mlp_channels(stack[i], plan.kept_channels)
        after = {i: _layer_params(layer) for i, layer in enumerate(stack)}
        achieved = [(before[i] - after[i]) / part[i] if part[i] else 0.0
                    for i in range(facts.num_layers)]
        shapes_after = sh.layer_shapes(model)
        total_after = sum(p.numel() for p in model.parameters())

        # 5. artifacts and metrics
        removed = total_before - total_after
        ctx.artifacts.mkdir(parents=True, exist_ok=True)
        (ctx.artifacts / li.FILE).write_text(json.dumps(analysis, indent=1) + "\n")
        if "fingerprint" in calib_cache:
            (ctx.artifacts / "calibration.json").write_text(
                json.dumps(calib_cache["fingerprint"], indent=2) + "\n")
        rows = ["layer,in_range,importance,ratio,heads_before,heads_after,kv_heads_before,"
                "kv_heads_after,intermediate_before,intermediate_after,params_before,"
                "params_after,prunable_before,removed_share_of_prunable"]
        for i in range(facts.num_layers):
            b, a = shapes_before[i], shapes_after[i]
            rows.append(",".join(str(x) for x in (
                i, int(i in plans), f"{importance[i]:.6g}", f"{ratios.get(i, 0.0):.6f}",
                b.get("num_attention_heads", ""), a.get("num_attention_heads", ""),
                b.get("num_key_value_heads", ""), a.get("num_key_value_heads", ""),
                b.get("intermediate_size", ""), a.get("intermediate_size", ""),
                before[i], after[i], part[i], f"{achieved[i]:.6f}")))
        rows.append(f"total,,,{config.sparsity:.6f},,,,,,,{total_before},{total_after},"
                    f"{prunable},{removed / prunable if prunable else 0.0:.6f}")
        (ctx.artifacts / "pruned_params.csv").write_text("\n".join(rows) + "\n")
        plot_strategy(importance, [ratios.get(i, 0.0) for i in range(facts.num_layers)],
                      achieved,
                      analysis.get("metric", "file"), options.strategy,
                      ctx.artifacts / "pruning_strategy.png")
        groups_removed = sum(p.remove_groups for p in plans.values())
        channels_removed = sum(p.remove_channels for p in plans.values())
        ctx.log.info("gqa_structured: removed %d of %d attention groups, %d of %d MLP channels, "
                     "%d parameters (%.2f%% of the prunable, %.2f%% of the model)",
                     groups_removed, sum(facts.groups[i] for i in layers), channels_removed,
                     sum(facts.channels[i] for i in layers), removed,
                     100 * removed / max(prunable, 1), 100 * removed / total_before)
        metrics = {"weights.total_before": float(total_before),
                   "weights.total_after": float(total_after),
                   "weights.removed": float(removed),
                   "weights.removed_share": removed / total_before,
                   "prune.prunable_params": float(prunable),
                   "prune.prunable_removed_share": removed / prunable if prunable else 0.0,
                   "prune.attention_groups_removed": float(groups_removed),
                   "prune.mlp_channels_removed": float(channels_removed),
                   "prune.layer_importance_cached": float(hit)}
        if "ids" in calib_cache:
            metrics["prune.calibration_tokens"] = float(calib_cache["ids"].numel())
        return metrics


def plot_strategy(importance: list[float], ratios: list[float], achieved: list[float],
                  metric: str, strategy: str, file) -> None:
    from sparselab.plots import plt
    x = list(range(len(importance)))
    fig, ax = plt.subplots(figsize=(max(6, len(x) * 0.25), 3.8))
    ax.bar(x, importance, color="#8da0cb", label=f"layer importance ({metric})")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"importance ({metric})")
    ax2 = ax.twinx()
    ax2.plot(x, ratios, color="#d95f02", marker="o", label=f"ratio ({strategy})")
    ax2.plot(x, achieved, color="#1b9e77", marker="x", linestyle="--",
             label="achieved (share of the layer's prunable params)")
    ax2.set_ylim(0, max(1e-3, max(ratios + achieved)) * 1.15)
    ax2.set_ylabel("pruning ratio")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    ax.set_title(f"gqa_structured: {strategy} ratios from {metric} importance")
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)
