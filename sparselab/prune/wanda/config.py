"""`prune.options` of method wanda (see sparselab.prune.wanda.method for the YAML and the algorithm)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sparselab.prune.options import BlockOptions, OwlOptions, TierOptions


class WandaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    variant: bool = False
    tiers: TierOptions = TierOptions()
    blocks: BlockOptions = BlockOptions()
    owl: OwlOptions = OwlOptions()
