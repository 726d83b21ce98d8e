"""Calibration data for the pruning methods (the walk over its activations: sparselab.prune.walk).

```yaml
prune:
  calibration: {data: wikitext2, samples: 128, seqlen: 512, seed: 0}
  # or a mixture: {data: {mix: {wikitext2: 0.5, squad: 0.5}}, samples: 128, seqlen: 512}
```

The samples (`calibration_set`):
- plain-text corpora, drawn as the `get_wikitext2` / `get_c4` loaders of the Wanda and SparseGPT
  code draw them, so the same text and seed give the reference's very windows: Python's
  `random.seed(seed)`, then per sample `randint(0, tokens - seqlen - 1)` as the window start, the
  text tokenized as the tokenizer does by default (a Llama tokenizer's BOS included). WikiText-2
  joins its training split with " " and tokenizes it once; C4 draws a document
  (`randint(0, documents - 1)`) until one has more than `seqlen` tokens, then a window inside it;
- task data (SQuAD, GSM8K, BoolQ): one rendered example (`prompt + answer`) per sample, examples
  visited in a seeded random order; an example shorter than `seqlen` gets the next examples packed
  after it (separated by EOS), so every sample really is `seqlen` tokens long;
- a mixture: each source supplies round(samples * weight) samples (largest remainder, so the counts
  add up to `samples`), in the mixture's (sorted) order.
The split is `dataset.training_split(source)`: `train`, else `validation` when that is not the split
evaluation scores; never the evaluation split. The same settings give the same ids on every machine.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from sparselab.data.catalog import DataSource, TaskDataset, TextCorpus
from sparselab.data.mixture import apportion
from sparselab.matrix import Calibration, data_components, describe_data


@dataclass
class CalibrationSet:
    """`input_ids` (samples x seqlen) and a fingerprint that identifies them (for logs and keys)."""
    input_ids: torch.Tensor
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def splits(self) -> dict[str, str]:
        return dict(self.fingerprint.get("splits", {}))


def calibration_set(tokenizer, calibration: Calibration, source: DataSource,
                    seed: int | None = None) -> CalibrationSet:
    """The calibration samples of a `prune.calibration` config (see the module docstring)."""
    from sparselab.registry import DATASETS
    seed = seed if seed is not None else calibration.seed if calibration.seed is not None else 0
    samples, seqlen = calibration.samples, calibration.seqlen
    counts = apportion(samples, data_components(calibration.data))
    parts, splits, per_source = [], {}, {}
    for name, count in counts.items():
        dataset = DATASETS.get(name)()
        split = dataset.training_split(source)
        splits[name] = split
        if count == 0:
            per_source[name] = {"split": split, "samples": 0}
            continue
        if isinstance(dataset, TextCorpus):
            ids, available = _text_windows(tokenizer, dataset, source, split, count, seqlen, seed)
        elif isinstance(dataset, TaskDataset):
            ids, available = _task_samples(tokenizer, dataset, source, split, count, seqlen, seed)
        else:
            raise ValueError(f"dataset '{name}' cannot be used for calibration")
        parts.append(ids)
        per_source[name] = {"split": split, "samples": count, **available}
    input_ids = torch.cat(parts, dim=0)
    assert input_ids.shape == (samples, seqlen), input_ids.shape
    fingerprint = {
        "data": describe_data(calibration.data),
        "splits": splits,
        "sources": per_source,
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens": int(input_ids.numel()),
        "sha256": ids_sha256(input_ids),
    }
    return CalibrationSet(input_ids, fingerprint)


def ids_sha256(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _encode(tokenizer, text: str, special_tokens: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special_tokens, return_attention_mask=False,
                     verbose=False)["input_ids"]


def _text_windows(tokenizer, dataset: TextCorpus, source: DataSource, split: str, count: int,
                  seqlen: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """`count` windows as the reference loaders draw them (see the module docstring)."""
    draw = random.Random(seed)
    if dataset.calibration_join is None:
        return _document_windows(tokenizer, dataset, source, split, count, seqlen, draw)
    ids = _encode(tokenizer, dataset.text(source, split, dataset.calibration_join), True)
    if len(ids) <= seqlen:
        raise ValueError(f"calibration dataset '{dataset.name}' ({split} split) has {len(ids)} "
                         f"tokens, too few for windows of seqlen {seqlen} (it needs more than "
                         f"{seqlen}); lower prune.calibration.seqlen or use more text.")
    starts = [draw.randint(0, len(ids) - seqlen - 1) for _ in range(count)]
    windows = [ids[s:s + seqlen] for s in starts]
    return torch.tensor(windows, dtype=torch.long), {"tokens_available": len(ids)}


def _document_windows(tokenizer, dataset: TextCorpus, source: DataSource, split: str, count: int,
                      seqlen: int, draw: random.Random) -> tuple[torch.Tensor, dict[str, int]]:
    """Per sample: documents drawn until one is longer than `seqlen`, then a window inside it."""
    documents = [r["text"] for r in dataset.records(source, split)]
    encoded: dict[int, list[int]] = {}
    too_short: set[int] = set()
    windows = []
    for _ in range(count):
        while True:
            index = draw.randint(0, len(documents) - 1)
            if index not in encoded:
                encoded[index] = _encode(tokenizer, documents[index], True)
            if len(encoded[index]) > seqlen:
                break
            too_short.add(index)
            if len(too_short) == len(documents):
                raise ValueError(f"calibration dataset '{dataset.name}' ({split} split) has no "
                                 f"document longer than seqlen {seqlen} tokens; lower "
                                 f"prune.calibration.seqlen.")
        start = draw.randint(0, len(encoded[index]) - seqlen - 1)
        windows.append(encoded[index][start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long), {"documents_available": len(documents)}


def _task_samples(tokenizer, dataset: TaskDataset, source: DataSource, split: str, count: int,
                  seqlen: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    examples = dataset.examples(source, split)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    separator = ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                 else _encode(tokenizer, "\n\n"))
    rows, position = [], 0
    for _ in range(count):
        row: list[int] = []
        while len(row) < seqlen:
            if position >= len(order):
                raise ValueError(
                    f"calibration dataset '{dataset.name}' ({split} split, {len(examples)} "
                    f"examples) cannot supply {count} samples of {seqlen} tokens without reusing "
                    f"examples; lower prune.calibration.samples or seqlen.")
            prompt, answer = examples[order[position]]
            position += 1
            if row:
                row.extend(separator)
            row.extend(_encode(tokenizer, prompt + answer))
        rows.append(row[:seqlen])
    return (torch.tensor(rows, dtype=torch.long),
            {"examples_used": position, "examples_available": len(examples)})
