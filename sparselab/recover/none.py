"""`method: none` — the pruned model passes through (the "pruned, not recovered" row)."""
from __future__ import annotations

from sparselab.models import LoadedModel
from sparselab.recover.base import RecoverContext, RecoveryMethod


class NoRecovery(RecoveryMethod):
    passes_through = True
    def recover(self, loaded: LoadedModel, ctx: RecoverContext) -> tuple[LoadedModel, dict]:
        return loaded, {}
