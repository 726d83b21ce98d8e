"""The library's entry point to a matrix: its cells (dense references first) and their plans.

`sparselab run / plan / export / report` and the benchmarks start here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sparselab.errors import UserError, unknown_name

if TYPE_CHECKING:  # the command line imports this module: pydantic only when it is used
    from sparselab.matrix import Cell


def dense_references(cells: list[Cell]) -> list[Cell]:
    """One dense reference per distinct model setting, named `dense` or, when a matrix has
    several, `dense[0]`, `dense[1]`, ... in the order the cells name them."""
    from sparselab.matrix import DENSE, dense_reference
    references: dict[str, Cell] = {}
    for cell in cells:
        reference = dense_reference(cell)
        references.setdefault(reference.hash, reference)
    refs = list(references.values())
    if len(refs) > 1:
        refs = [ref.model_copy(update={"name": f"{DENSE}[{i}]"}) for i, ref in enumerate(refs)]
    return refs


def prepare_plans(matrix: str, only: str | None, sets: tuple[str, ...], data_dir: str | None,
                  limits: tuple[int, int] | None = None):
    """Matrix file -> validated cells (dense reference first) and their stage plans.
    `limits`: (max cells, max YAML nodes), the --max-cells / --max-nodes caps."""
    from sparselab.matrix import (
        DENSE,
        MAX_CELLS,
        MAX_NODES,
        expand,
        load_matrix,
        parse_set,
    )
    from sparselab.stages import plan_cell
    from sparselab.validate import check_cells, source_of
    max_cells, max_nodes = limits or (MAX_CELLS, MAX_NODES)
    mf = load_matrix(matrix, max_nodes=max_nodes)
    cells = expand(mf, parse_set(sets), data_dir=data_dir, max_cells=max_cells)
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        known = {c.name for c in cells} | {c.id for c in cells} | \
            {c.experiment for c in cells if c.experiment}
        for name in wanted:
            if name not in known and name != DENSE:
                raise UserError("--only: " + unknown_name("cell", name, known))
        cells = [c for c in cells if c.name in wanted or c.id in wanted
                 or c.experiment in wanted]
    cells = dense_references(cells) + cells
    check_cells(mf, cells)
    plans = [plan_cell(cell, source_of(cell)) for cell in cells]
    return mf, plans
