"""`prune.options` of method sparsegpt (see sparselab.prune.sparsegpt.method for the YAML and the
algorithm)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from sparselab.prune.options import BlockOptions, OwlOptions, TierOptions


class SparseGPTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    blocksize: PositiveInt = 128
    percdamp: float = Field(0.01, gt=0.0)
    per_row: bool = False
    tiers: TierOptions = TierOptions()
    blocks: BlockOptions = BlockOptions()
    owl: OwlOptions = OwlOptions()
