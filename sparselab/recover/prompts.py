"""Training examples for recovery: packed plain text, or task examples with the loss on the answer.

Task examples are rendered with the prompt the evaluation harness asks (the catalog's `prompt`),
so fine-tuning on SQuAD teaches exactly the format SQuAD is scored in. Prompt tokens get label
-100; only the answer tokens (and the closing eos) carry loss.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sparselab.data.catalog import DataSource, TaskDataset, TextCorpus
from sparselab.data.mixture import apportion
from sparselab.matrix import DataRef, data_components
from sparselab.registry import DATASETS

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TrainingSet:
    train: list[Example]
    held_out: list[Example]
    splits: dict[str, str]  # dataset -> split used

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train)


def text_windows(tokenizer, text: str, seqlen: int) -> list[Example]:
    """Non-overlapping `seqlen` windows of the tokenized text (the ragged tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [Example(ids[i:i + seqlen], ids[i:i + seqlen])
            for i in range(0, len(ids) - seqlen + 1, seqlen)]


def task_example(tokenizer, prompt: str, answer: str, seqlen: int) -> Example:
    """bos + prompt + answer + eos, labels only on answer + eos; long prompts lose their start."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = seqlen - len(bos) - len(answer_ids)
    if room < 1:
        answer_ids = answer_ids[: seqlen - len(bos) - 1]
        room = 1
    prompt_ids = prompt_ids[-room:]
    ids = bos + prompt_ids + answer_ids
    labels = [IGNORE] * (len(bos) + len(prompt_ids)) + answer_ids
    return Example(ids, labels)


def build_training_set(tokenizer, ref: DataRef, source: DataSource, samples: int, seqlen: int,
                       seed: int) -> TrainingSet:
    """`samples` examples mixed by weight, shuffled with `seed`; a small slice is held out."""
    rng = random.Random(seed)
    pool: list[Example] = []
    splits = {}
    components = data_components(ref)
    counts = apportion(samples, components)
    for name, count in counts.items():
        dataset = DATASETS.get(name)()
        split = dataset.training_split(source)
        splits[name] = split
        if isinstance(dataset, TextCorpus):
            candidates = text_windows(tokenizer, dataset.text(source, split), seqlen)
        elif isinstance(dataset, TaskDataset):
            candidates = [task_example(tokenizer, p, a, seqlen)
                          for p, a in dataset.examples(source, split)]
        else:  # pragma: no cover - the catalog has only these two kinds
            raise TypeError(f"dataset {name} cannot be used for training")
        rng.shuffle(candidates)
        if not candidates:
            raise ValueError(f"dataset '{name}' split '{split}' gives no training example of "
                             f"seqlen {seqlen}")
        # cycle when the split is smaller than asked (epochs over a small set)
        pool += [candidates[i % len(candidates)] for i in range(count)]
    rng.shuffle(pool)
    held = max(1, min(32, len(pool) // 20))
    return TrainingSet(pool[held:], pool[:held], splits)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}
