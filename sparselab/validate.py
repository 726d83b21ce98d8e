"""Checks that need more than the schema, done before any model loads or any run is created:
method-specific rules (patterns, option combinations, model shapes), and that every file a stage
will read is there. (Each method's options are validated by the schema itself, as the file is read.)
"""
from __future__ import annotations

import os

from sparselab.data.catalog import DataSource, TaskDataset, TextCorpus, resolve_data_dir
from sparselab.errors import UserError
from sparselab.matrix import Cell, MatrixFile, data_components
from sparselab.models import context_length, linear_names, model_source
from sparselab.registry import DATASETS, PRUNING, RECOVERY


def source_of(cell: Cell) -> DataSource:
    return resolve_data_dir(cell.config.data_dir)


def check_cells(mf: MatrixFile, cells: list[Cell]) -> None:
    for cell in cells:
        try:
            _check_cell(cell)
        except UserError as exc:
            exc.file = exc.file or mf.path
            exc.message = f"in cell '{cell.name}': {exc.message}"
            if exc.key and exc.line is None:
                exc.line = mf.line_of(("experiments", str(cell.experiment), exc.key),
                                      ("defaults", *exc.key.split(".")), tuple(exc.key.split(".")))
            raise


def _check_cell(cell: Cell) -> None:
    cfg = cell.config
    try:
        source = source_of(cell)
    except UserError as exc:
        raise UserError(exc.message, key="data_dir") from None
    if source.is_hub and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError("no data directory is set and the hub is offline (HF_DATASETS_OFFLINE=1); "
                        "pass --data-dir (e.g. ../shared/data), set data_dir in the matrix, or "
                        "use 'builtin' for the shipped fixtures.", key="data_dir")
    method = PRUNING.get(cfg.prune.method)()
    _as_user_error(lambda: method.check(cfg.prune), "prune")
    prunes = not method.passes_through
    if prunes and method.needs_calibration:
        _check_training_data(cfg.prune.calibration.data, source, "prune.calibration.data")
    model_config = model_source(cfg.model).config(cfg.trust_remote_code)
    if model_config is not None and prunes:
        _as_user_error(lambda: method.check_model(cfg.prune, model_config), "prune")
    context = context_length(model_config) if model_config is not None else None
    for key, seqlen in _seqlens(cell).items():
        if context is not None and seqlen > context:
            raise UserError(f"seqlen {seqlen} is longer than the context of model "
                            f"'{cfg.model}' ({context} tokens).", key=key)
    recovery = RECOVERY.get(cfg.recover.method)()
    if not recovery.passes_through:
        names = linear_names(model_config) if model_config is not None else None
        _as_user_error(lambda: recovery.check(cfg.recover, names), "recover.lora.targets")
        if recovery.needs_pruned_parent and not prunes:
            raise UserError(f"recovery method '{cfg.recover.method}' keeps the pruned weights "
                            "at zero, but this cell prunes nothing (prune.method: none), so "
                            "there is no mask; use lora, or prune first.", key="recover.method")
        _check_training_data(cfg.recover.data, source, "recover.data")
    if cfg.evaluate.perplexity is not None:
        dataset = DATASETS.get(cfg.evaluate.perplexity.data)()
        if not isinstance(dataset, TextCorpus):
            raise UserError(f"perplexity needs a plain-text dataset (wikitext2, c4), not "
                            f"'{dataset.name}'.", key="evaluate.perplexity.data")
        _require(dataset, source, dataset.eval_split, "evaluate.perplexity.data")
    if cfg.evaluate.answer_loss is not None:
        for name in cfg.evaluate.answer_loss.data:
            dataset = DATASETS.get(name)()
            if not isinstance(dataset, TaskDataset):
                raise UserError(f"answer_loss scores the answers of task data (squad, gsm8k, "
                                f"boolq), not the plain text '{name}' (that is "
                                "evaluate.perplexity).", key="evaluate.answer_loss.data")
            _require(dataset, source, dataset.eval_split, "evaluate.answer_loss.data")
    if cfg.evaluate.tasks:
        from sparselab.evaluate.tasks import check_tasks
        _as_user_error(lambda: check_tasks(cfg.evaluate, source), "evaluate.tasks")


def _seqlens(cell: Cell) -> dict[str, int]:
    cfg = cell.config
    out = {}
    if not PRUNING.get(cfg.prune.method).passes_through:
        out["prune.calibration.seqlen"] = cfg.prune.calibration.seqlen
    if not RECOVERY.get(cfg.recover.method).passes_through:
        out["recover.train.seqlen"] = cfg.recover.train.seqlen
    if cfg.evaluate.perplexity is not None:
        out["evaluate.perplexity.seqlen"] = cfg.evaluate.perplexity.seqlen
    if cfg.evaluate.answer_loss is not None:
        out["evaluate.answer_loss.seqlen"] = cfg.evaluate.answer_loss.seqlen
    return out


def _as_user_error(check, key: str) -> None:
    try:
        check()
    except ValueError as exc:
        raise UserError(str(exc), key=key) from None


def _check_training_data(ref, source: DataSource, key: str) -> None:
    for name in data_components(ref):
        dataset = DATASETS.get(name)()
        try:
            dataset.training_split(source)
        except UserError as exc:
            raise UserError(exc.message, key=key) from None
        if not isinstance(dataset, (TextCorpus, TaskDataset)):
            raise UserError(f"dataset '{name}' cannot be used for training", key=key)


def _require(dataset, source: DataSource, split: str, key: str) -> None:
    if not dataset.has_split(source, split):
        raise UserError(dataset.missing(source, split), key=key)
