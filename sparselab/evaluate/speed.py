"""What a model costs at inference: prefill latency, decode throughput, peak memory and the size
of its weights, on dense kernels and on the sparse kernels that can use the model's zeros.

Zeros alone buy nothing on dense kernels (a matmul multiplies them like any other number), so
the stage looks at where the zeros of the decoder's linear layers are and measures the kernel
made for that structure, next to the dense one:

| zeros                              | kernel (tag `sparselab.speed.kernel`)                       |
|------------------------------------|-------------------------------------------------------------|
| none (dense, structured shrink)    | dense only; a shrunken model runs its real, smaller shapes  |
| whole B x B blocks (block:BxB, the | `bsr<B>`: torch sparse BSR (block CSR) on CPU and GPU       |
| removed tier of `tiers`)           |                                                             |
| 2:4 in every row                   | `semi_2_4`: `to_sparse_semi_structured` (cuSPARSELt or      |
|                                    | CUTLASS) on CUDA GPUs with sparse tensor cores, half types  |
| anywhere else                      | `csr`: torch sparse CSR (MKL on CPU)                        |

Where no kernel of this machine can use the zeros (2:4 on a CPU, say), nothing is guessed: the
cell's numbers are the dense kernel's and its `sparselab.speed.kernel` tag says "none", with
the reason in `sparselab.speed.kernels`.

Timing: a fixed number of threads, warm-up calls, then repeated calls timed with
`time.perf_counter` (CUDA synchronised); the median and the interquartile range are logged.
Each sparse kernel's logits are compared with the dense kernel's on the same input; a kernel
whose outputs differ beyond the dtype's tolerance is reported as wrong, not as fast.
"""
from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparselab.memory import PeakMemory
from sparselab.prune.layers import prunable_linears
from sparselab.shapes import base_model

# A matrix counts as block-sparse at block size B when this share of its B x B tiles is all zero
# and the tiles at B hold nearly all the zero tiles found at the finest size tried.
BLOCK_SIZES = (64, 32, 16, 8, 4)
MIN_ZERO_TILES = 0.05
MIN_ZEROS = 0.05  # below this share of zeros a matrix is treated as dense
# Logits of a sparse kernel may differ from the dense kernel's by summation order only.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


@dataclass(frozen=True)
class Kernel:
    """A weight layout and the matmul that uses it."""
    name: str
    about: str
    layout: Callable[[torch.Tensor], torch.Tensor]


def dense_kernel_about(device: torch.device) -> str:
    return "torch dense matmul" + (" (cuBLAS)" if device.type == "cuda" else
                                   " (MKL)" if torch.backends.mkl.is_available() else "")


def _semi_structured(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured
    return to_sparse_semi_structured(weight)


def _compact_csr(weight: torch.Tensor) -> torch.Tensor:
    """CSR of `weight` holding what CSR holds: `to_sparse_csr` converts through COO and its
    column indices are a view of the COO's (2 x nnz) indices, which keeps every row index too
    (8 more bytes per kept weight). Copies of all three parts, so no view keeps it alive."""
    csr = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().clone(), csr.col_indices().clone(),
                                   csr.values().clone(), csr.shape, check_invariants=False)


CSR = Kernel("csr", "torch sparse CSR matmul", _compact_csr)
SEMI_2_4 = Kernel("semi_2_4", "torch to_sparse_semi_structured (2:4 sparse tensor cores)",
                  _semi_structured)


def bsr_kernel(block: int) -> Kernel:
    return Kernel(f"bsr{block}", f"torch sparse BSR matmul, {block}x{block} blocks",
                  lambda w: w.to_sparse_bsr((block, block)))


@dataclass(frozen=True)
class Structure:
    """Where a model's zeros are: the share of zero weights in the prunable linears, whether
    every row is 2:4 and the block size (0: none) whose all-zero tiles hold the zeros."""
    zeros: float
    two_four: bool
    block: int
    block_zero_tiles: float


def zero_tiles(weight: torch.Tensor, block: int) -> float:
    """The share of the weight's block x block tiles that are all zero (0 if it does not tile)."""
    rows, cols = weight.shape
    if rows % block or cols % block:
        return 0.0
    tiles = (weight != 0).reshape(rows // block, block, cols // block, block).any(dim=(1, 3))
    return 1.0 - tiles.float().mean().item()


def structure(model: nn.Module) -> Structure:
    linears = list(prunable_linears(model).values())
    weights = [linear.weight.detach() for linear in linears]
    total = sum(w.numel() for w in weights)
    zeros = sum((w == 0).sum().item() for w in weights) / max(total, 1)
    two_four = zeros >= MIN_ZEROS and all(
        w.shape[1] % 4 == 0 and bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
        for w in weights)
    shares = {b: sum(zero_tiles(w, b) * w.numel() for w in weights) / max(total, 1)
              for b in BLOCK_SIZES}
    finest = shares[BLOCK_SIZES[-1]]
    block = next((b for b in BLOCK_SIZES if shares[b] >= MIN_ZERO_TILES
                  and shares[b] >= 0.9 * finest), 0)
    return Structure(zeros, two_four, block, shares.get(block, 0.0))


def kernel_for(found: Structure, device: torch.device, dtype: torch.dtype
               ) -> tuple[Kernel | None, str]:
    """The sparse kernel made for these zeros on this device, or None and why not."""
    if found.zeros < MIN_ZEROS:
        return None, "no zeros to skip"
    if found.block:
        return bsr_kernel(found.block), ""
    if found.two_four:
        if device.type != "cuda":
            return None, "2:4 runs on sparse tensor cores (CUDA GPUs); this machine has none"
        if dtype not in (torch.float16, torch.bfloat16):
            return None, "2:4 sparse tensor cores take float16 or bfloat16 weights"
        return SEMI_2_4, ""
    return CSR, ""


class SparseLinear(nn.Module):
    """A linear layer whose weight is kept in a sparse layout and multiplied by its kernel."""

    def __init__(self, linear: nn.Linear, kernel: Kernel):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = kernel.layout(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        """The dense layer back, exactly (a sparse layout stores every nonzero as it was)."""
        weight = self.weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=False,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = self.bias
        return linear


def _parents(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Each prunable linear's parent module and attribute name (a peft wrapper's `base_layer`
    included), by the linear's module name."""
    targets = {id(linear) for linear in prunable_linears(model).values()}
    found = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if id(child) in targets:
                found[f"{parent_name}.{child_name}"] = (parent, child_name)
    return found


@contextmanager
def using_kernel(model: nn.Module, kernel: Kernel) -> Iterator[int]:
    """Swap every prunable linear for a SparseLinear holding its weight in the kernel's layout
    (the dense weight is let go, so memory is the layout's), and swap the dense ones back after.
    Yields how many linears were swapped."""
    parents = _parents(model)
    for parent, name in parents.values():
        setattr(parent, name, SparseLinear(getattr(parent, name), kernel))
    try:
        yield len(parents)
    finally:
        for parent, name in parents.values():
            setattr(parent, name, getattr(parent, name).to_linear())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held now: sparse layouts count values and indices."""
    total = 0
    for module in model.modules():
        tensors = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                   if t is not None]
        if isinstance(module, SparseLinear):
            tensors = [*_layout_parts(module.weight), *([module.bias] if module.bias is not None
                                                        else [])]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _layout_parts(weight: torch.Tensor) -> list[torch.Tensor]:
    if weight.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [weight.values(), weight.crow_indices(), weight.col_indices()]
    if hasattr(weight, "packed"):  # semi-structured: the kept values and their metadata
        return [t for t in (weight.packed, getattr(weight, "meta", None)) if t is not None]
    return [weight]


def spread(values: list[float]) -> float:
    """The interquartile range (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def summary(name: str, values: list[float]) -> dict[str, float]:
    """The median of repeated timings, their interquartile range, and the median's standard
    error from it (normal approximation: 1.2533 x (IQR / 1.349) / sqrt(n)), which the report's
    unpaired test uses to tell a speed-up from timing noise."""
    iqr = spread(values)
    return {name: statistics.median(values), f"{name}_iqr": iqr,
            f"{name}_stderr": 1.2533 * iqr / 1.349 / math.sqrt(len(values))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], float | None], device: torch.device, warmup: int,
          repeats: int) -> list[float]:
    """Time `call` `repeats` times after `warmup` untimed calls. A call may return the seconds
    of its own timed part (decode leaves its untimed prefill out)."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        own = call()
        _sync(device)
        seconds.append(own if own is not None else time.perf_counter() - start)
    return seconds


def random_tokens(vocab: int, batch: int, length: int, device: torch.device,
                  seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


# Sparse layouts made outside inference mode cannot be used inside it: no_grad throughout.
@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False)


def _cache_argument(model: nn.Module) -> str:
    """transformers 5 calls the KV cache `cache`; 4.x called it `past_key_values`."""
    forward = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


@torch.no_grad()
def decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding of `new_tokens` after the prompt `ids`, one token per step on the KV
    cache; returns the seconds of the decode steps alone (the prompt's prefill is not counted)."""
    name = _cache_argument(model)
    out = model(input_ids=ids, use_cache=True)
    cache, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@dataclass(frozen=True)
class SpeedSettings:
    """What is timed (the `evaluate.speed` section's fields)."""
    prompt_lengths: tuple[int, ...] = (128, 512)
    batch_sizes: tuple[int, ...] = (1, 8)
    decode_prompt: int = 64
    new_tokens: int = 32
    warmup: int = 2
    repeats: int = 5
    seed: int = 0

    @classmethod
    def of(cls, section) -> SpeedSettings:
        """The settings of an `evaluate.speed` section (sparselab.matrix.Speed)."""
        return cls(tuple(section.prompt_lengths), tuple(section.batch_sizes),
                   section.decode_prompt, section.new_tokens, section.warmup, section.repeats)


def measure(model: nn.Module, settings: SpeedSettings, vocab: int) -> dict[str, float]:
    """Every number of one kernel: `prefill_ms_<L>`, `decode_tok_s_b<B>` (each with `_iqr`
    and `_stderr`), `peak_mb` and `weights_mb`."""
    device = next(model.parameters()).device
    metrics = {"weights_mb": weight_bytes(model) / 2**20}
    with PeakMemory(device) as memory:
        for length in settings.prompt_lengths:
            ids = random_tokens(vocab, 1, length, device, settings.seed)
            metrics.update(summary(f"prefill_ms_{length}", [1e3 * s for s in timed(
                lambda: prefill(model, ids), device, settings.warmup, settings.repeats)]))
        for batch in settings.batch_sizes:
            ids = random_tokens(vocab, batch, settings.decode_prompt, device, settings.seed)
            metrics.update(summary(f"decode_tok_s_b{batch}", [
                batch * settings.new_tokens / s for s in timed(
                    lambda: decode(model, ids, settings.new_tokens), device, settings.warmup,
                    settings.repeats)]))
    metrics["peak_mb"] = memory.peak_bytes / 2**20
    return metrics


@dataclass
class SpeedResult:
    metrics: dict[str, float]
    kernel: str  # the cell's kernel: a sparse kernel's name, or "none"
    notes: dict[str, str]  # kernel name -> what ran it, or why it was not used


def speed(model: nn.Module, settings: SpeedSettings, vocab: int) -> SpeedResult:
    """The model on the dense kernel, then on the sparse kernel its zeros fit (if this device
    has one): `speed.dense.*`, `speed.<kernel>.*` with its `max_abs_diff` from the dense
    logits, and the cell's own numbers as `speed.*` (the sparse kernel's where it ran correctly,
    else the dense kernel's)."""
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    found = structure(model)
    dense = measure(model, settings, vocab)
    metrics = {f"speed.dense.{k}": v for k, v in dense.items()}
    metrics.update({"speed.zeros": found.zeros, "speed.block_zero_tiles": found.block_zero_tiles})
    notes = {"dense": dense_kernel_about(device)}
    kernel, why_not = kernel_for(found, device, dtype)
    if kernel is None:
        notes["none"] = why_not
        return SpeedResult(_with_own(metrics, dense), "none", notes)
    check = random_tokens(vocab, 2, min(64, settings.prompt_lengths[0]), device, settings.seed)
    reference = logits_of(model, check)
    try:
        with using_kernel(model, kernel) as swapped:
            diff = (logits_of(model, check) - reference).abs().max().item()
            numbers = measure(model, settings, vocab) if diff <= TOLERANCE[dtype] * max(
                1.0, reference.abs().max().item()) else None
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # no such kernel here
        notes["none"] = f"{kernel.name} failed on this device: {type(exc).__name__}: {exc}"[:300]
        return SpeedResult(_with_own(metrics, dense), "none", notes)
    metrics[f"speed.{kernel.name}.max_abs_diff"] = diff
    metrics[f"speed.{kernel.name}.linears"] = swapped
    if numbers is None:
        notes["none"] = f"{kernel.name} is wrong here: logits differ by {diff:.3g} from dense"
        return SpeedResult(_with_own(metrics, dense), "none", notes)
    metrics.update({f"speed.{kernel.name}.{k}": v for k, v in numbers.items()})
    notes[kernel.name] = kernel.about
    return SpeedResult(_with_own(metrics, numbers), kernel.name, notes)


def _with_own(metrics: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    return {**metrics, **{f"speed.{k}": v for k, v in own.items()}}
