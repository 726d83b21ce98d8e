"""Name -> implementation registries, imported lazily (as lm-eval does for its tasks).

Validating a matrix only needs the names; the heavy modules (torch, transformers, lm-eval) are
imported when a stage actually runs. Adding a method is one module plus one line here.
"""
from __future__ import annotations

import importlib
from typing import Any

from sparselab.errors import unknown_name


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def target(self, name: str) -> str:
        return self._entries[name]

    def check(self, name: str) -> None:
        """Raise ValueError (turned into a UserError by the caller) for an unknown name."""
        if name not in self._entries:
            raise ValueError(unknown_name(self.kind, name, self._entries))

    def get(self, name: str) -> Any:
        self.check(name)
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)


PRUNING = Registry("pruning method", {
    "none": "sparselab.prune.none:NoPruning",
    "magnitude": "sparselab.prune.magnitude:MagnitudePruning",
    "wanda": "sparselab.prune.wanda:WandaPruning",
    "sparsegpt": "sparselab.prune.sparsegpt:SparseGPTPruning",
    "gqa_structured": "sparselab.prune.gqa_structured:GQAStructuredPruning",
})

RECOVERY = Registry("recovery method", {
    "none": "sparselab.recover.none:NoRecovery",
    "lora": "sparselab.recover.lora:LoraRecovery",
    "dense": "sparselab.recover.dense:DenseRecovery",
})

DATASETS = Registry("dataset", {
    "wikitext2": "sparselab.data.wikitext2:WikiText2",
    "c4": "sparselab.data.c4:C4",
    "squad": "sparselab.data.squad:SquadV2",
    "gsm8k": "sparselab.data.gsm8k:GSM8K",
    "boolq": "sparselab.data.boolq:BoolQ",
})

TASKS = Registry("evaluation task", {
    "squadv2": "sparselab.evaluate.tasks:SQUADV2",
    "gsm8k": "sparselab.evaluate.tasks:GSM8K",
    "boolq": "sparselab.evaluate.tasks:BOOLQ",
    # lm-eval tasks run untouched; they read the hub (or its local caches) only
    "arc_easy": "sparselab.evaluate.tasks:ARC_EASY",
    "arc_challenge": "sparselab.evaluate.tasks:ARC_CHALLENGE",
    "hellaswag": "sparselab.evaluate.tasks:HELLASWAG",
    "piqa": "sparselab.evaluate.tasks:PIQA",
    "winogrande": "sparselab.evaluate.tasks:WINOGRANDE",
    "openbookqa": "sparselab.evaluate.tasks:OPENBOOKQA",
    "lambada_openai": "sparselab.evaluate.tasks:LAMBADA_OPENAI",
})

MODELS = Registry("model", {
    "tiny-llama": "sparselab.models:TinyLlama",
    "smollm2-135m": "sparselab.models:SmolLM2GGUF",
})

ALL = {"pruning": PRUNING, "recovery": RECOVERY, "datasets": DATASETS, "tasks": TASKS,
       "models": MODELS}
