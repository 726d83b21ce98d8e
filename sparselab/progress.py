"""Progress of the running stage, for the terminal's live display.

Stages call `report(done, total, unit)` as they go (calibration layers, training steps with their
loss, perplexity windows, answer-loss examples); `sparselab run` listens and draws it with an ETA.
Nobody listening (tests, Ray workers) makes it a no-op.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

AFFECTS_RESULTS = False  # plans or reports only: sparselab.provenance leaves it out

Listener = Callable[[int, int, str], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(done: int, total: int, unit: str) -> None:
    """`done` of `total` `unit`s of the current stage are finished (unit: "layers", ...)."""
    for listener in _listeners:
        listener(done, total, unit)
