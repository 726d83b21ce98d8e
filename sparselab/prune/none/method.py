"""`method: none` — the model passes through unpruned (the dense reference)."""
from __future__ import annotations

from sparselab.models import LoadedModel
from sparselab.prune.base import PruneContext, PruningMethod


class NoPruning(PruningMethod):
    passes_through = True
    patterns = ("unstructured",)

    def check(self, config) -> None:
        super().check(config)
        if config.sparsity:
            raise ValueError("method 'none' prunes nothing; set sparsity: 0 or pick a method.")

    def prune(self, loaded: LoadedModel, ctx: PruneContext) -> dict[str, float]:
        return {}
