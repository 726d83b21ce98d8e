"""Option groups several pruning methods share: `options.tiers` (the three-tier hybrid pattern),
`options.blocks` (how blocks are compared) and `options.owl` (OWL's per-layer ratios). Torch-free: the schema validates them as the matrix is
read (sparselab.prune.patterns and sparselab.prune.owl use them)."""
from __future__ import annotations

from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator,
                      model_validator)

from sparselab.matrix import parse_pattern


class NoOptions(BaseModel):
    """A method without options: `prune.options` must be empty."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierOptions(BaseModel):
    """`options.tiers`: shares of dense / N:M / removed blocks, the N:M pattern, the block size."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    ratios: tuple[float, float, float] = (0.35, 0.45, 0.20)
    nm: str = "2:4"
    block: PositiveInt = 16

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ValueError(f"tiers.ratios {list(ratios)} must be three non-negative shares "
                             "(dense, N:M, removed) that sum to 1")
        return ratios

    @field_validator("nm")
    @classmethod
    def _nm(cls, nm: str) -> str:
        kind, _ = parse_pattern(nm)
        if kind != "nm":
            raise ValueError(f"tiers.nm '{nm}' must be an N:M pattern such as '2:4'")
        return nm

    @model_validator(mode="after")
    def _block_fits_nm(self) -> TierOptions:
        if self.block % self.nm_args[1]:
            raise ValueError(f"tiers.block {self.block} must be a multiple of M={self.nm_args[1]} "
                             f"of tiers.nm '{self.nm}'")
        return self

    @property
    def nm_args(self) -> tuple[int, int]:
        return parse_pattern(self.nm)[1]  # type: ignore[return-value]

    @property
    def sparsity(self) -> float:
        n, m = self.nm_args
        return self.ratios[1] * (1 - n / m) + self.ratios[2]


class BlockOptions(BaseModel):
    """`options.blocks`: which blocks of `block:RxC` and `tiers` compete with each other.

    `group: matrix` ranks every block of a weight matrix against every other (one ranking can
    empty whole input columns: the blocks of low-activation inputs all score low); `row` ranks the
    blocks of each block-row (R output rows) among themselves, Wanda's per-output comparison one
    block coarser; `column` ranks those of each block-column (C inputs), so no input loses more
    than the target share of its blocks. Each group removes (or tiers) its own share. With
    `normalize: true` each input column's scores are divided by their mean over the rows before
    blocks are summed, so an input's activation scale no longer decides whole columns."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    group: Literal["matrix", "row", "column"] = "matrix"
    normalize: bool = False


class OwlOptions(BaseModel):
    """`options.owl`: outlier threshold M (times the layer mean) and the ratio spread lambda."""
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    M: PositiveFloat = 5.0
    lam: float = Field(0.08, alias="lambda", ge=0.0, lt=0.5)
