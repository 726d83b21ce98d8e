"""The stage keys of every shipped matrix, as recorded in stage_keys.json.

A key names a cache entry, so a change here means every user's cached stages of that kind are
recomputed: refactors must leave the keys as they are, and a change that is meant (a stage's
version bumped, a shipped matrix edited) is recorded on purpose with

    python tests/test_stage_keys.py --write
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest.mock import patch

from sparselab.data.catalog import DataSource
from sparselab.matrix import expand, load_matrix
from sparselab.stages import plan_cell
from sparselab.study import dense_references

ROOT = Path(__file__).resolve().parent.parent
RECORD = Path(__file__).with_name("stage_keys.json")
SOURCE = DataSource(Path("../shared/data"), "../shared/data")  # only its label enters the keys


def stage_keys() -> dict[str, dict[str, dict[str, str]]]:
    """matrix file -> cell -> role -> stage key, dense references first. The speed stage's key
    names the machine's hardware: recorded for a fixed name, so the record holds everywhere."""
    out = {}
    with patch("sparselab.stages.speed.hardware_label", lambda: "cpu: recorded"):
        for path in sorted([*ROOT.glob("matrix/*.yaml"), *ROOT.glob("tests/matrices/*.yaml")]):
            cells = expand(load_matrix(path))
            out[str(path.relative_to(ROOT))] = {
                cell.id: {role: stage.key for role, stage in plan_cell(cell, SOURCE).roles()}
                for cell in [*dense_references(cells), *cells]}
    return out


def test_stage_keys_are_the_recorded_ones():
    recorded = json.loads(RECORD.read_text())
    now = stage_keys()
    assert now.keys() == recorded.keys(), "a matrix was added or removed: --write"
    for matrix, cells in recorded.items():
        assert now[matrix] == cells, f"{matrix}: stage keys changed"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    RECORD.write_text(json.dumps(stage_keys(), indent=1, sort_keys=True) + "\n")
