"""`prune.options` of method magnitude (see sparselab.prune.magnitude.method for the YAML)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sparselab.prune.options import BlockOptions, TierOptions


class MagnitudeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tiers: TierOptions = TierOptions()
    blocks: BlockOptions = BlockOptions()
