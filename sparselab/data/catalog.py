"""The data catalog: where each dataset lives (hub or a local folder) and how it is rendered.

A data directory has the layout of `../shared/data` (see `fixtures/` for a small one the package
ships). `data_dir: builtin` points at those fixtures; `null` means the Hugging Face hub.
Every dataset offers the same three renderings: calibration text, fine-tuning (prompt, answer)
pairs, and the split that evaluation scores.
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sparselab.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
BUILTIN = "builtin"


@dataclass(frozen=True)
class DataSource:
    """Where datasets come from: the hub, or a folder laid out like ../shared/data."""
    path: Path | None
    label: str  # what keys and logs show: "hub", "builtin" or the folder as given

    @property
    def is_hub(self) -> bool:
        return self.path is None


def resolve_data_dir(value: str | None) -> DataSource:
    """`--data-dir` / `data_dir:` / $SPARSELAB_DATA_DIR -> a DataSource (relative to the cwd)."""
    value = value if value is not None else os.environ.get("SPARSELAB_DATA_DIR")
    if value is None:
        return DataSource(None, "hub")
    if value == BUILTIN:
        return DataSource(FIXTURES, BUILTIN)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"data directory '{value}' does not exist (relative paths are read from "
                        f"the current directory); give a folder laid out like ../shared/data, "
                        f"'{BUILTIN}' for the shipped fixtures, or null for the hub.",
                        key="data_dir")
    return DataSource(path.resolve(), value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Dataset:
    """One catalog entry. Subclasses set the class variables and the record readers."""
    name: ClassVar[str]
    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    # split -> candidate file names inside the data directory, in order of preference
    local_files: ClassVar[dict[str, tuple[str, ...]]]
    # the split that evaluation scores; calibration and training never read it
    eval_split: ClassVar[str]
    hub_splits: ClassVar[dict[str, str]] = {}
    # bumped when the text a dataset gives changes: part of the key of every stage that reads it
    revision: ClassVar[int] = 1

    def local_path(self, source: DataSource, split: str) -> Path | None:
        for relative in self.local_files.get(split, ()):
            candidate = source.path / relative
            if candidate.is_file():
                return candidate
        return None

    def has_split(self, source: DataSource, split: str) -> bool:
        if source.is_hub:
            return split in self.hub_splits
        return self.local_path(source, split) is not None

    def training_split(self, source: DataSource) -> str:
        """'train' where present, else 'validation' when that is not the scored split."""
        for split in ("train", "validation"):
            if split != self.eval_split and self.has_split(source, split):
                return split
        raise UserError(self.missing(source, "train"), key=self.name)

    def missing(self, source: DataSource, split: str) -> str:
        if source.is_hub:
            return f"dataset '{self.name}' has no '{split}' split on the hub."
        looked = ", ".join(str(source.path / f) for f in self.local_files.get(split, ())) or "-"
        return (f"dataset '{self.name}' split '{split}' not found in data directory "
                f"'{source.label}' (looked for: {looked}).")

    def require(self, source: DataSource, split: str) -> None:
        if not self.has_split(source, split):
            raise UserError(self.missing(source, split), key=self.name)

    def records(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        self.require(source, split)
        if source.is_hub:
            import datasets
            data = datasets.load_dataset(self.hub_id, self.hub_config, split=self.hub_splits[split])
            return [self.from_hub(row) for row in data]
        return self.read_local(self.local_path(source, split))

    def read_local(self, path: Path) -> list[dict[str, Any]]:
        return read_jsonl(path)

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        return dict(row)


class TextCorpus(Dataset):
    """Plain running text (WikiText-2, C4): calibration windows, packed training, perplexity."""
    # How the reference code (Wanda, SparseGPT) cuts calibration windows from the training split:
    # a string joins all rows into one text (WikiText-2: " "); None draws a document per sample (C4).
    calibration_join: ClassVar[str | None] = " "

    def text(self, source: DataSource, split: str, separator: str = "\n\n") -> str:
        """The rows joined: by default with "\\n\\n", as the papers join the test split."""
        return separator.join(r["text"] for r in self.records(source, split))


class TaskDataset(Dataset, abc.ABC):
    """Question/answer data rendered with the evaluation prompt; the loss falls on the answer."""

    @abc.abstractmethod
    def prompt(self, record: dict[str, Any]) -> str:
        """The text the model sees, as the evaluation harness asks it."""

    @abc.abstractmethod
    def answer(self, record: dict[str, Any]) -> str:
        """The target continuation (with its leading space)."""

    def examples(self, source: DataSource, split: str) -> list[tuple[str, str]]:
        return [(self.prompt(r), self.answer(r)) for r in self.records(source, split)]
