"""Turning importance scores into masks, for every sparsity pattern (True = keep the weight).

Patterns: `unstructured` (per output row or across the layer), `N:M` (keep the N highest of every M
consecutive input weights of a row), `block:RxC` (whole blocks removed, lowest summed score first),
and `tiers`, the three-tier hybrid:

```yaml
prune:
  pattern: tiers
  options:
    tiers: {ratios: [0.35, 0.45, 0.20], nm: "2:4", block: 16}
    blocks: {group: matrix, normalize: false}   # block:RxC and tiers: which blocks compete
```
The weight matrix is cut into `block` x `block` blocks ranked by their summed score: the top
`ratios[0]` of the blocks stay dense, the next `ratios[1]` get N:M inside the block, the last
`ratios[2]` are removed. Overall sparsity = ratios[1] * (1 - N/M) + ratios[2]: with the defaults
0.45 * 0.5 + 0.20 = 0.425 (the tiers fix it: `prune.sparsity` records it, another value is
refused). Block counts per tier are rounded to whole blocks (dense and removed rounded to nearest,
the N:M tier takes the rest).
Blocks are ranked across the whole matrix, or within each block-row or block-column
(`options.blocks`, sparselab.prune.options.BlockOptions); every group then holds its own counts.

After a layer is pruned, `Pattern.verify` checks the invariants and raises `PatternViolation`:
every pruned weight is zero, N:M holds in every group, removed blocks are all zero, block and tier
counts are exact in every comparison group, and the share of pruned weights equals the target
within the rounding of one row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparselab.matrix import parse_pattern
from sparselab.prune.options import BlockOptions, TierOptions


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Remove the lowest-scored `sparsity` share, within each output row or across the layer."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, False)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            idx = torch.topk(scores.flatten(), k, largest=False).indices
            mask.view(-1)[idx] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive input weights of each row (N:M sparsity)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) divisible by {m}")
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, drop, False)
    return mask.reshape(rows, cols)


def block_scores(scores: torch.Tensor, br: int, bc: int, normalize: bool = False
                 ) -> torch.Tensor:
    """Summed score of every br x bc block, shape (rows/br, cols/bc); with `normalize` each input
    column's scores are first divided by their mean over the rows (`options.blocks.normalize`)."""
    rows, cols = scores.shape
    if rows % br or cols % bc:
        raise ValueError(f"block {br}x{bc} does not divide the weight matrix {rows}x{cols}")
    if normalize:
        mean = scores.mean(dim=0, keepdim=True)
        scores = scores / torch.where(mean > 0, mean, torch.ones_like(mean))
    return scores.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))


def expand_blocks(block_mask: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    return block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def grouped(per_block: torch.Tensor, group: str) -> torch.Tensor:
    """The blocks as one comparison group per row: the whole matrix, each block-row, or each
    block-column (`options.blocks.group`). `ungrouped` turns such a view back."""
    if group == "matrix":
        return per_block.reshape(1, -1)
    return per_block if group == "row" else per_block.t()


def ungrouped(values: torch.Tensor, group: str, shape: torch.Size) -> torch.Tensor:
    if group == "matrix":
        return values.reshape(shape)
    return values if group == "row" else values.t()


def block_mask(scores: torch.Tensor, sparsity: float, br: int, bc: int,
               blocks: BlockOptions = BlockOptions()) -> torch.Tensor:
    """Remove whole blocks, lowest summed score first, floor(`sparsity` x its blocks) in each
    comparison group."""
    per_block = block_scores(scores, br, bc, blocks.normalize)
    keep = unstructured_mask(grouped(per_block, blocks.group), sparsity, per_row=True)
    return expand_blocks(ungrouped(keep, blocks.group, per_block.shape), br, bc)


def mask_for_pattern(scores: torch.Tensor, pattern: str, sparsity: float,
                     per_row: bool) -> torch.Tensor:
    """The mask of one weight matrix for a pattern string of the matrix file (default options)."""
    kind, args = parse_pattern(pattern)
    if kind == "unstructured":
        return unstructured_mask(scores, sparsity, per_row)
    if kind == "nm":
        return nm_mask(scores, *args)
    if kind == "block":
        return block_mask(scores, sparsity, *args)
    raise ValueError(f"pattern '{pattern}' has no score-to-mask rule here")


# --- tiers (their options: sparselab.prune.options.TierOptions) ------------------------------

def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def tier_counts(blocks: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(dense, N:M, removed) block counts of a comparison group of `blocks` blocks."""
    removed = min(blocks, _round_half_up(blocks * ratios[2]))
    dense = min(blocks - removed, _round_half_up(blocks * ratios[0]))
    return dense, blocks - dense - removed, removed


DENSE_TIER, NM_TIER, REMOVED_TIER = 0, 1, 2


def block_tiers(scores: torch.Tensor, tiers: TierOptions,
                blocks: BlockOptions = BlockOptions()) -> torch.Tensor:
    """The tier (0 dense, 1 N:M, 2 removed) of every block, shape (rows/B, cols/B): within each
    comparison group the highest-scored blocks stay dense, the lowest are removed."""
    per_block = block_scores(scores, tiers.block, tiers.block, blocks.normalize)
    groups = grouped(per_block, blocks.group)
    dense, nm, removed = tier_counts(groups.shape[1], tiers.ratios)
    by_rank = torch.tensor([DENSE_TIER] * dense + [NM_TIER] * nm + [REMOVED_TIER] * removed,
                           dtype=torch.long, device=scores.device).expand_as(groups)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    tier = torch.empty_like(order).scatter_(1, order, by_rank)
    return ungrouped(tier, blocks.group, per_block.shape)


def tiers_mask(scores: torch.Tensor, tiers: TierOptions,
               blocks: BlockOptions = BlockOptions()) -> torch.Tensor:
    """Dense top blocks, N:M (by element score) in the middle blocks, the last blocks removed."""
    b = tiers.block
    tier = expand_blocks(block_tiers(scores, tiers, blocks), b, b)
    keep = tier == DENSE_TIER
    return keep | ((tier == NM_TIER) & nm_mask(scores, *tiers.nm_args))


# --- one pattern, its masks and its invariants -------------------------------------------------

class PatternViolation(ValueError):
    """A pruned layer breaks the invariants of its pattern (a bug, or weights changed under us)."""


@dataclass(frozen=True)
class Pattern:
    """A parsed `prune.pattern` with its tier and block options: makes masks, checks pruned
    layers."""
    text: str
    kind: str
    args: tuple[int, ...]
    tiers: TierOptions | None = None
    blocks: BlockOptions = BlockOptions()

    @classmethod
    def parse(cls, pattern: str, tiers: TierOptions | None = None,
              blocks: BlockOptions | None = None) -> Pattern:
        kind, args = parse_pattern(pattern)
        if kind == "tiers" and tiers is None:
            tiers = TierOptions()
        return cls(pattern, kind, args, tiers if kind == "tiers" else None,
                   blocks or BlockOptions())

    @classmethod
    def of(cls, config) -> Pattern:
        """The pattern of a `prune` section, with the method's `tiers` and `blocks` options."""
        options = config.method_options
        return cls.parse(config.pattern, getattr(options, "tiers", None),
                         getattr(options, "blocks", None))

    @property
    def block_shape(self) -> tuple[int, int] | None:
        """(rows, columns) of one block of `block:RxC` or `tiers`; None for other patterns."""
        if self.kind == "block":
            return self.args  # type: ignore[return-value]
        return (self.tiers.block,) * 2 if self.kind == "tiers" else None

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself implies (N:M, tiers); None when it is a free choice."""
        if self.kind == "nm":
            n, m = self.args
            return 1 - n / m
        if self.kind == "tiers":
            return self.tiers.sparsity
        return None

    def target(self, sparsity: float) -> float:
        fixed = self.fixed_sparsity
        return sparsity if fixed is None else fixed

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        """Raise ValueError naming the layer when the pattern cannot tile the weight matrix."""
        rows, cols = shape
        if self.kind == "nm" and cols % self.args[1]:
            raise ValueError(f"pattern '{self.text}': the input width {cols} of {name} is not "
                             f"divisible by M={self.args[1]}")
        if self.block_shape is not None:
            br, bc = self.block_shape
            if rows % br or cols % bc:
                raise ValueError(f"pattern '{self.text}': block {br}x{bc} does not divide the "
                                 f"{rows}x{cols} weight of {name}")

    def mask(self, scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
        if self.kind == "tiers":
            return tiers_mask(scores, self.tiers, self.blocks)
        if self.kind == "block":
            return block_mask(scores, sparsity, *self.args, self.blocks)
        return mask_for_pattern(scores, self.text, sparsity, per_row)

    def verify(self, name: str, weight: torch.Tensor, keep: torch.Tensor, sparsity: float,
               slack: float) -> float:
        """Check a pruned weight against its mask; return the mask's pruned share.

        `slack`: how many weights the pruned count may differ from sparsity * numel (the rounding
        of one row per unit the method rounds in); N:M, blocks and tiers are checked exactly,
        blocks and tiers in each comparison group of `options.blocks.group`.
        """
        if bool((weight[~keep] != 0).any()):
            raise PatternViolation(f"{name}: {int((weight[~keep] != 0).sum())} weights outside "
                                   "the mask are not zero")
        rows, cols = keep.shape
        pruned = int((~keep).sum())
        if self.kind == "nm":
            self._verify_nm(name, weight, keep, *self.args)
        elif self.kind == "block":
            br, bc = self.args
            removed = grouped(self._verify_whole_blocks(name, keep, br, bc) == 0,
                              self.blocks.group)
            expected = int(removed.shape[1] * sparsity)  # block_mask's count in each group
            if bool((removed.sum(dim=1) != expected).any()):
                raise PatternViolation(f"{name}: {pruned / keep.numel():.4f} of the weights "
                                       f"pruned, target {sparsity:.4f} ({expected} blocks "
                                       f"removed in each {self.blocks.group} group)")
        elif self.kind == "tiers":
            self._verify_tiers(name, weight, keep)
        elif abs(pruned - sparsity * keep.numel()) > slack + 1e-6:
            raise PatternViolation(f"{name}: {pruned / keep.numel():.4f} of the weights pruned, "
                                   f"target {sparsity:.4f} (allowed rounding: {slack:g} weights)")
        return pruned / keep.numel()

    @staticmethod
    def _verify_nm(name: str, weight: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> None:
        rows, cols = keep.shape
        kept = keep.reshape(rows, cols // m, m).sum(dim=2)
        nonzero = (weight != 0).reshape(rows, cols // m, m).sum(dim=2)
        if bool((kept != n).any()) or bool((nonzero > n).any()):
            raise PatternViolation(f"{name}: {n}:{m} does not hold in every group of {m}")

    @staticmethod
    def _verify_whole_blocks(name: str, keep: torch.Tensor, br: int, bc: int) -> torch.Tensor:
        rows, cols = keep.shape
        kept = keep.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))
        if bool(((kept != 0) & (kept != br * bc)).any()):
            raise PatternViolation(f"{name}: a {br}x{bc} block is partly pruned")
        return kept

    def _verify_tiers(self, name: str, weight: torch.Tensor, keep: torch.Tensor) -> None:
        b, (n, m) = self.tiers.block, self.tiers.nm_args
        rows, cols = keep.shape
        kept = keep.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))
        groups = grouped(kept, self.blocks.group)
        expected = tier_counts(groups.shape[1], self.tiers.ratios)
        for counts in zip(*((groups == k).sum(dim=1).tolist() for k in (b * b, b * b * n // m, 0))):
            if counts != expected:
                raise PatternViolation(f"{name}: tiers hold {counts} (dense, N:M, removed) "
                                       f"blocks in a {self.blocks.group} group, expected "
                                       f"{expected}")
        tier = torch.full(kept.shape, NM_TIER, device=keep.device)
        tier[kept == b * b] = DENSE_TIER
        tier[kept == 0] = REMOVED_TIER
        in_nm = expand_blocks(tier == NM_TIER, b, b)
        groups_kept = keep.reshape(rows, cols // m, m).sum(dim=2)
        groups_nm = in_nm.reshape(rows, cols // m, m)[:, :, 0]
        if bool((groups_kept[groups_nm] != n).any()):
            raise PatternViolation(f"{name}: {n}:{m} does not hold inside every N:M-tier block")


def check_against_model(config, pattern: Pattern, model_config) -> None:
    """Validation with the model's config (no weights): the ratio list's length, skip_layers, and
    whether the pattern tiles every linear of a decoder layer. Raises ValueError."""
    from sparselab.prune.layers import linear_shapes
    from sparselab.prune.owl import validate_ratios
    layers = getattr(model_config, "num_hidden_layers", None)
    if layers is not None:
        validate_ratios(config, layers)
    for name, shape in (linear_shapes(model_config) or {}).items():
        pattern.check_shape(name, shape)
