"""The memory plan: each stage's peak accelerator and host memory, predicted from the model's config.

`sparselab plan --device-memory 80GiB` prints it and refuses, before any model loads, a stage that
cannot fit. The predictions count the tensors a stage holds at its peak, from the shape alone
(parameters, dtype, layer sizes) and the cell's settings (calibration samples x seqlen, batch sizes,
optimizer state); each stage kind says what it holds (`StageKind.memory`), each pruning and recovery
method what it adds (`layer_memory`, `memory`). Allocator slack, CUDA context and library buffers
are not in them: `HEADROOM` is kept free for those.

Placement: `resident` keeps the whole model on the accelerator; `onload` keeps the weights on the
host and moves one decoder layer at a time to the accelerator (sparselab.onload), so the layer-wise
stages need one layer's weights there, not the model's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

AFFECTS_RESULTS = False  # plans or reports only: sparselab.provenance leaves it out

GIB = 1024 ** 3
HEADROOM = 0.9  # of the device's memory a plan may fill: the rest is allocator slack and context
TASK_CONTEXT = 2048  # the longest lm-eval prompt a plan assumes (the data decides)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-style decoder that memory depends on."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        return cls(vocab=config.vocab_size, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one decoder layer, in the order they run."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, \
            self.kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def layer_params(self) -> int:
        return sum(o * i for o, i in self.linears().values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        """The token embedding and, when not tied to it, the output head (and the final norm)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params

    @property
    def largest_linear(self) -> int:
        return max(o * i for o, i in self.linears().values())


@dataclass(frozen=True)
class MemoryContext:
    """What a stage's prediction knows: the model's shape and dtype and where its weights live."""
    shape: Shape
    dtype: str
    onload: bool = False
    zeros: float = 0.0  # the share of the decoder's linear weights the cell's pruning zeroes

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def weights(self) -> int:
        return self.shape.params * self.bytes

    @property
    def resident_weights(self) -> int:
        """The weights a whole-model stage holds on the accelerator: all of them, or onloaded,
        the largest single module (a decoder layer or the embedding/head)."""
        if not self.onload:
            return self.weights
        s = self.shape
        return max(s.layer_params, s.vocab * s.hidden) * self.bytes

    def activations(self, samples: int, seqlen: int, copies: int = 1) -> int:
        """`copies` of a layer's hidden states for every calibration sample on the accelerator;
        onloaded, they stay on the host and one sample's input and output visit."""
        held = 2 if self.onload else copies * samples
        return held * seqlen * self.shape.hidden * self.bytes

    def layer_forward(self, tokens: int) -> int:
        """Transient bytes of one decoder layer's forward without gradients over `tokens`
        (batch x seqlen): the residual, its norm, and the MLP's gate, up, activation and
        product (attention's q, k, v and output are smaller than the MLP in every Llama)."""
        s = self.shape
        return tokens * (2 * s.hidden + 3 * s.intermediate) * self.bytes

    def logits(self, batch: int, seqlen: int) -> int:
        """The model's logits in its dtype, plus `token_nll`'s float64 copy and log-softmax of
        one row."""
        v = self.shape.vocab
        return batch * seqlen * v * self.bytes + 2 * seqlen * v * 8


@dataclass
class Need:
    """A stage's predicted peak: accelerator and host bytes, and the terms of the accelerator's."""
    device: int
    host: int
    parts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, parts: dict[str, int], host: int) -> Need:
        """Accelerator = the sum of `parts` (on a CPU-only run, the host's memory holds it)."""
        return cls(sum(parts.values()), host, {k: v for k, v in parts.items() if v})

    def largest(self, count: int = 2) -> str:
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:count]
        return ", ".join(f"{name} {gib(value)}" for name, value in top)


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value < 10 * GIB else f"{value / GIB:.1f} GiB"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GIB, "gb": 10 ** 9, "mib": 1024 ** 2, "mb": 10 ** 6, "tib": 1024 ** 4,
          "tb": 10 ** 12, None: GIB}


def parse_size(text: str) -> int:
    """'80GiB', '80 GB', '141' (GiB) -> bytes; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a memory size; write e.g. 80GiB, 24GB or 512MiB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def scoring_need(m: MemoryContext, batch: int, seqlen: int) -> Need:
    """A forward pass without gradients over batches of `batch` x `seqlen` whose logits are
    scored (perplexity, answer losses): the model, then the larger of one layer's transient and
    the logits with their float64 scoring."""
    return Need.of({"weights": m.resident_weights,
                    "logits": max(m.logits(batch, seqlen), m.layer_forward(batch * seqlen))},
                   m.weights if m.onload else 0)


def mask_working(out: int, inputs: int, pruned: float) -> int:
    """Choosing one linear's mask from float32 scores: the scores (and the temporary they are
    computed through), the top-k values and int64 indices of the pruned share, the bool mask."""
    numel = out * inputs
    return numel * max(8, 5 + int(12 * pruned))


def walk_need(m: MemoryContext, samples: int, seqlen: int, stats: dict[str, int],
              working: dict[str, int], increment: int) -> Need:
    """A layer-wise pruning walk (sparselab.prune.walk): the weights (onloaded: one layer, or
    the embedding while the first layer's inputs are caught), every sample's activations of the
    current layer (onloaded: on the host, one sample's input and output on the accelerator), and
    the larger of the statistics pass (all its linears' statistics, one layer's forward on one
    sample, the statistics' per-sample increment) and the pruning of each linear in turn (the
    statistics still held and that linear's working memory)."""
    s = m.shape
    activations = samples * seqlen * s.hidden * m.bytes
    gather = sum(stats.values()) + m.layer_forward(seqlen) + increment
    held, pruning = sum(stats.values()), 0
    for name in s.linears():
        pruning = max(pruning, held + working[name])
        held -= stats[name]
    return Need.of({"weights": m.resident_weights,
                    "activations": m.activations(samples, seqlen),
                    "layer work": max(gather, pruning)},
                   m.weights + activations if m.onload else 0)


def training_need(m: MemoryContext, train, trainable: int, saved_per_token: int,
                  extra: dict[str, int] | None = None) -> Need:
    """Fine-tuning on batches of `train.batch_size` x `train.seqlen` with AdamW.

    The weights and AdamW's two moments of the trainable parameters (in their dtype, from the
    first step on); then the backward's peak: at its start the tensors autograd saved, per token
    and decoder layer (`saved_per_token` bytes, the method's count), the logits and the float32
    log-softmax the loss saved with the gradients flowing back through both; as it proceeds the
    saved tensors are freed while the gradients (one per trainable parameter) fill in, so the
    larger of the two counts. Under bf16 autocast of float32 weights: the bf16 copies autocast
    keeps of every linear's weight.

    `train.gradient_checkpointing`: autograd keeps each decoder layer's input only, plus one
    layer's saved tensors while it is recomputed. `train.optimizer: adafactor`: no moments worth
    counting (a row and a column vector per matrix), but its step works on a float32 copy of one
    parameter's gradient at a time and two temporaries of that size (the largest: the embedding),
    after the backward, beside all the gradients.
    """
    s = m.shape
    tokens = train.batch_size * train.seqlen
    compute = 2 if train.precision == "bf16" else m.bytes
    if train.gradient_checkpointing:
        activations = s.layers * tokens * s.hidden * compute + tokens * saved_per_token
    else:
        activations = s.layers * tokens * saved_per_token
    logits = tokens * s.vocab * (compute + 8 + (4 if compute != 4 else 0))
    gradients = trainable * m.bytes
    moments, step = 2 * trainable * m.bytes, 0
    if train.optimizer == "adafactor":
        moments = 0
        step = 3 * min(trainable, max(s.vocab * s.hidden, s.largest_linear)) * 4
    parts = {
        "weights": m.weights,
        "AdamW moments": moments,
        "activations": activations,
        "logits + loss": logits,
        # after the backward its tensors are gone; the gradients (and the step's temporaries)
        # count where they exceed them
        "gradients": max(0, gradients + step - activations - logits),
        "autocast copies": (s.layers * sum(o * i for o, i in s.linears().values()) * 2
                            if train.precision == "bf16" and m.bytes == 4 else 0),
        **(extra or {}),
    }
    return Need.of(parts, 0)


def saved_per_token(m: MemoryContext, precision: str, trained_inputs: dict[str, int],
                    full: bool) -> int:
    """Bytes autograd saves per token in one Llama decoder layer.

    Always: both RMSNorms' float32 inputs, attention's q, k, v and output, the MLP's gate
    (SiLU's input), up and SiLU(gate) (the product's inputs). `trained_inputs`: LoRA targets
    with dropout, by input width: each keeps its dropout's output and mask. `full` (every
    weight trains): each linear's input too, for its weight's gradient (q, k and v share one,
    as gate and up do).
    """
    s = m.shape
    b = 2 if precision == "bf16" else m.bytes
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    saved = 2 * s.hidden * 4 + (2 * q + 2 * kv) * b + 3 * s.intermediate * b
    saved += sum(width * (b + 1) for width in trained_inputs.values())
    if full:
        saved += (2 * s.hidden + q + s.intermediate) * b
    return saved


@dataclass
class StageMemory:
    """One distinct stage of a matrix with its predicted peak (None: not predicted)."""
    cell: str
    role: str
    key: str
    label: str
    need: Need | None
    onloaded: bool


def matrix_memory(plans, onload: bool) -> list[StageMemory]:
    """The predicted peak of every distinct stage of the plans (`sparselab.study.prepare_plans`),
    from each cell's model config alone; stages of a model whose config is unreachable (a hub id
    offline) are not predicted."""
    from sparselab.models import model_source
    from sparselab.registry import PRUNING
    shapes: dict[str, Shape | None] = {}
    rows, seen = [], set()
    for plan in plans:
        cfg = plan.cell.config
        if cfg.model not in shapes:
            config = model_source(cfg.model).config(cfg.trust_remote_code)
            shapes[cfg.model] = Shape.of(config) if config is not None else None
        shape = shapes[cfg.model]
        method = PRUNING.get(cfg.prune.method)
        zeros = cfg.prune.sparsity if method.leaves_zeros and not method.passes_through else 0.0
        for role, stage in plan.roles():
            if stage.key in seen:
                continue
            seen.add(stage.key)
            onloaded = onload and stage.kind.onloads_for(stage.section)
            need = None if shape is None else \
                stage.kind.memory(stage.section, MemoryContext(shape, cfg.dtype, onloaded, zeros))
            rows.append(StageMemory(plan.cell.id, role, stage.key, stage.label, need,
                                    onloaded))
    return rows


def refuse_unfit(rows: list[StageMemory], device_memory: int, device: str, matrix: str) -> None:
    """Raise a UserError naming every stage whose predicted accelerator peak exceeds
    `HEADROOM` of `device_memory`, and the settings that would shrink it."""
    from sparselab.errors import UserError
    usable = int(device_memory * HEADROOM)
    unfit = [r for r in rows if r.need is not None and r.need.device > usable]
    if not unfit:
        return
    from sparselab.stages import kind_named
    by_kind: dict[str, list[StageMemory]] = {}
    for row in unfit:
        by_kind.setdefault(kind_named(row.role).name, []).append(row)
    lines = []
    for name, group in by_kind.items():
        worst = max(group, key=lambda r: r.need.device)
        hint = kind_named(worst.role).memory_hint
        if worst.need.parts.get("weights", 0) > usable \
                and (worst.onloaded or not kind_named(worst.role).onloads):
            hint = ("it needs the whole model on the device and its weights alone exceed it: "
                    "it needs more than one device, which sparselab does not split a stage "
                    "across yet")
        cells = ", ".join(dict.fromkeys(r.cell for r in group))
        lines.append(f"{name} ({len(group)} stage(s), cells {cells}; the largest "
                     f"'{worst.label}' needs {gib(worst.need.device)}: {worst.need.largest()}): "
                     f"{hint}")
    raise UserError(
        f"{len(unfit)} stage(s) of {matrix} cannot fit {device} ({gib(device_memory)}, of which "
        f"a plan may fill {HEADROOM:.0%}) — " + "; ".join(lines) + ". Nothing was loaded or run.")
