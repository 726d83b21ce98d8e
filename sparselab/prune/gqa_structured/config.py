"""`prune.options` of method gqa_structured (see sparselab.prune.gqa_structured.method for the YAML
and the algorithm)."""
from __future__ import annotations

from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, field_validator,
                      model_validator)

# the layer-importance analyses sparselab.prune.layer_importance computes
LAYER_IMPORTANCE_METRICS = ("removal", "cosine")


class GQAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    attention: bool = True
    mlp: bool = True
    importance: Literal["taylor", "magnitude"] = "taylor"
    layer_importance: str = "removal"
    strategy: Literal["uniform", "inverse", "linear"] = "uniform"
    layer_range: tuple[NonNegativeInt, NonNegativeInt] | None = None
    spread: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("layer_importance")
    @classmethod
    def _layer_importance(cls, value: str) -> str:
        if value not in LAYER_IMPORTANCE_METRICS and not value.endswith(".json"):
            raise ValueError(f"layer_importance must be removal, cosine or the path of a "
                             f"layer_importance.json (got '{value}')")
        return value

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value):
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"layer_range [start, end) needs start < end (got {list(value)})")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> GQAOptions:
        if not (self.attention or self.mlp):
            raise ValueError("options attention and mlp are both false: nothing to prune")
        return self


# --- per-layer ratios -----------------------------------------------------------------------------
