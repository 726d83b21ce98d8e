"""Per-example scores of an evaluation stage, kept so that two cells can be compared pairwise.

Every cell answers the same questions and is scored on the same perplexity windows, so the report
joins two cells example by example (`sparselab.stats`) instead of treating their means as
independent. Each evaluation stage writes `artifacts/examples.json`:

    {"version": 1,
     "aggregate": {"wikitext2.ppl": "exp_mean", "squad.answer_nll": "mean", ...},
     "full_score": {"squadv2.f1": 100.0, "boolq.acc": 1.0, ...},
     "fingerprint": {"wikitext2.ppl": "3f2a…", ...},
     "scores": {"wikitext2.ppl": {"wikitext2/window/0": 3.41, ...},
                "squadv2.f1": {"squadv2/doc/17": 100.0, ...}, ...}}

An example id is `<task or data>/<kind>/<index>` (the lm-eval doc id, the example's index in the
evaluation split, the window's index), stable across cells evaluated the same way. A metric's
value is the mean of its per-example scores (`mean`) or, for perplexity, exp of the mean of the
windows' losses (`exp_mean`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

EXAMPLES_FILE = "examples.json"
Aggregate = Literal["mean", "exp_mean"]


@dataclass
class ExampleScores:
    """metric -> example id -> score, how each metric's value aggregates its scores, for
    bounded scores the score of a full hit (1 for accuracy, 100 for SQuAD's percentages: a
    metric scored only 0 is then still known to be a 0/1 score), and a fingerprint of what was
    scored (the windows' token ids, the documents and prompts), so that two cells scored on
    different data under the same names are never paired."""
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregate: dict[str, Aggregate] = field(default_factory=dict)
    full_score: dict[str, float] = field(default_factory=dict)
    fingerprint: dict[str, str] = field(default_factory=dict)

    def add(self, metric: str, ids: Iterable[str], values: Iterable[float],
            aggregate: Aggregate = "mean", full_score: float | None = None,
            fingerprint: str | None = None) -> None:
        self.scores.setdefault(metric, {}).update(zip(ids, map(float, values)))
        self.aggregate[metric] = aggregate
        if full_score is not None:
            self.full_score[metric] = full_score
        if fingerprint is not None:
            self.fingerprint[metric] = fingerprint

    def merge(self, other: ExampleScores) -> None:
        for metric, scores in other.scores.items():
            self.scores.setdefault(metric, {}).update(scores)
            self.aggregate[metric] = other.aggregate[metric]
        self.full_score.update(other.full_score)
        self.fingerprint.update(other.fingerprint)

    def renamed(self, rename: Callable[[str], str]) -> ExampleScores:
        return ExampleScores(*({rename(m): v for m, v in part.items()} for part in
                               (self.scores, self.aggregate, self.full_score, self.fingerprint)))

    def value(self, metric: str) -> float:
        """The metric as the stage reports it, recomputed from the scores."""
        return float(aggregate(list(self.scores[metric].values()), self.aggregate[metric]))

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / EXAMPLES_FILE
        path.write_text(json.dumps({"version": 1, "aggregate": self.aggregate,
                                    "full_score": self.full_score,
                                    "fingerprint": self.fingerprint, "scores": self.scores}))
        return path

    @classmethod
    def read(cls, path: Path) -> ExampleScores:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        return cls(data["scores"], data["aggregate"], data.get("full_score", {}),
                   data.get("fingerprint", {}))


def aggregate(values, how: Aggregate):
    """A metric's value from its scores (last axis): their mean, or exp of it for perplexity."""
    mean = np.asarray(values, dtype=np.float64).mean(axis=-1)
    return np.exp(mean) if how == "exp_mean" else mean


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def role_metric(role: str, metric: str) -> str:
    """A stage's metric under the name its role logs it: the pruned model's perplexity (role
    `perplexity_pruned`) is `<data>.ppl_pruned`."""
    return metric.replace(".ppl", ".ppl_pruned") if role == "perplexity_pruned" else metric


def example_id(source: str, kind: str, index: Any) -> str:
    return f"{source}/{kind}/{index}"
