"""A cell's final model as an ordinary Hugging Face folder, with a model card.

    sparselab export matrix/task_specific.yaml exp1 --to exported/exp1 [--merge]

What lands in the folder depends on the cell's last model stage:

- dense, pruned, or recovered by dense fine-tuning (or LoRA with `merge: true`): the weights,
  config and tokenizer, copied bit for bit from the stage cache;
- recovered by LoRA: the pruned base there, and the adapter in peft's format in `adapter/`, its
  `base_model_name_or_path` set to the exported base, so `AutoPeftModelForCausalLM` loads the
  model the adapter was trained on;
- with `--merge`: one model with the adapter folded in. Merging adds a dense low-rank update, so
  the pruned weights are filled back in; the card records the merged model's real density.

Structurally pruned models (`gqa_structured`) have per-layer shapes that transformers' Llama config
cannot describe: they load through `sparselab.load_model(folder)` (the shapes are in
`sparselab_shapes.json`); plain `from_pretrained` refuses them. The card says which applies.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparselab import __version__
from sparselab.cache import StageCache
from sparselab.errors import UserError
from sparselab.stages import STORED, CellPlan, Stage, stage_status

EXPORT_FILE = "sparselab_export.json"  # provenance for programs; README.md is for people


@dataclass
class Exported:
    folder: Path
    kind: str  # model | adapter | merged
    loader: str  # how to load it, one line of Python
    sparsity: dict[str, float] = field(default_factory=dict)


def export_cell(plan: CellPlan, matrix_name: str, dest: Path, merge: bool,
                run_id: str | None = None) -> Exported:
    """Write the cell's final model to `dest` (which must be absent or empty)."""
    cache = StageCache()
    missing = [s for s in plan.model.lineage() if stage_status(s, cache) not in STORED]
    if missing:
        raise UserError(f"cell '{plan.cell.name}' has not been run by this code: its stage "
                        f"{missing[0].kind.name} ({missing[0].label}, key {missing[0].key}) is "
                        f"{stage_status(missing[0], cache)} in the cache {cache.root}. Run it "
                        f"first: sparselab run <matrix> --only {plan.cell.name}", key="CELL")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"--to {dest}: the folder exists and is not empty; give a new folder "
                        "(nothing is overwritten).", key="--to")
    final = plan.model
    entry = final.entry(cache) if not final.external else None
    adapter = entry is not None and (entry.path / "adapter").is_dir()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if adapter and merge:
            exported = _merged(plan, dest)
        elif adapter:
            _write_model(final.parent, plan, dest)
            shutil.copytree(entry.path / "adapter", dest / "adapter")
            config_file = dest / "adapter" / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = str(dest.resolve())
            config_file.write_text(json.dumps(config, indent=2))
            exported = Exported(dest, "adapter", _adapter_loader(dest))
        else:
            if merge:
                raise UserError(f"--merge: cell '{plan.cell.name}' has no adapter to merge (its "
                                f"model is {final.label}); export it without --merge.",
                                key="--merge")
            _write_model(final, plan, dest)
            exported = Exported(dest, "model", _model_loader(dest))
        exported.sparsity = _sparsity(dest, exported.kind)
        _write_card(plan, matrix_name, exported, run_id)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # no half-exported folder
        raise
    return exported


def _write_model(stage: Stage, plan: CellPlan, dest: Path) -> None:
    """A model stage's weights into `dest`: copied from its entry, or saved from an external
    source (a hub id or folder the dense cell reads in place)."""
    from sparselab.models import model_source, save_model
    if stage.external:
        cfg = plan.cell.config
        save_model(model_source(cfg.model).load(cfg.dtype, cfg.trust_remote_code), dest)
        return
    entry = stage.entry(StageCache(), full=True)  # weights hashed before copying
    if entry is None:
        raise UserError(f"the cache entry of {stage.label} ({stage.kind.name}/{stage.key}) is "
                        "damaged and was set aside; run the cell again, then export.", key="CELL")
    for item in (entry.path / "model").iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)


def _merged(plan: CellPlan, dest: Path) -> Exported:
    from sparselab.models import LoadedModel, save_model
    from sparselab.runner import StageRunner
    loaded = StageRunner(StageCache()).model(plan.model, plan)
    merged = LoadedModel(loaded.model.merge_and_unload(), loaded.tokenizer)
    save_model(merged, dest)
    return Exported(dest, "merged", _model_loader(dest))


def _structured(folder: Path) -> bool:
    from sparselab.shapes import SHAPES_FILE
    return (folder / SHAPES_FILE).is_file()


def _model_loader(folder: Path) -> str:
    if _structured(folder):
        return f"sparselab.load_model({str(folder)!r}).model  # per-layer shapes"
    return f"transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})"


def _adapter_loader(folder: Path) -> str:
    if _structured(folder):
        return (f"peft.PeftModel.from_pretrained(sparselab.load_model({str(folder)!r}).model, "
                f"{str(folder / 'adapter')!r})")
    return f"peft.AutoPeftModelForCausalLM.from_pretrained({str(folder / 'adapter')!r})"


def _sparsity(folder: Path, kind: str) -> dict[str, float]:
    """The exported weights' own sparsity (the base's, for an adapter), read back from disk."""
    from sparselab.models import load_model
    from sparselab.prune.layers import sparsity_report
    overall = sparsity_report(load_model(folder).model)[1]
    return {k: v for k, v in overall.items() if k.startswith("sparsity.")}


def _write_card(plan: CellPlan, matrix_name: str, exported: Exported, run_id: str | None) -> None:
    from sparselab.runner import cell_metrics
    cache = StageCache()
    cfg = plan.cell.config
    entries = {role: e for role, stage in plan.roles()
               if not stage.external and (e := stage.entry(cache)) is not None}
    metrics = {k: v for k, v in cell_metrics(plan, entries).items() if not k.startswith("time.")}
    stages = {role: stage.key for role, stage in plan.roles()}
    provenance = {"sparselab_version": __version__, "matrix": matrix_name,
                  "cell": plan.cell.name, "cell_hash": plan.cell.hash, "run_id": run_id,
                  "kind": exported.kind, "stages": stages, "sparsity": exported.sparsity}
    (exported.folder / EXPORT_FILE).write_text(json.dumps(provenance, indent=2))
    from sparselab.models import model_source
    library = "peft" if exported.kind == "adapter" else "transformers"
    front = {"library_name": library}
    if hub_id := model_source(cfg.model).hub_id:
        front["base_model"] = hub_id
    front["tags"] = ["sparselab", "pruned", f"prune-{cfg.prune.method}",
                     f"recover-{cfg.recover.method}"]
    notes = {
        "model": "The weights are exactly the cell's final model (copied from the stage cache).",
        "adapter": "The base model here is the pruned model the adapter was trained on; the "
                   "adapter (peft format, `adapter/`) names it as its base and is kept separate, "
                   "so the base stays sparse.",
        "merged": "The LoRA adapter is merged into the weights. Merging adds a dense low-rank "
                  "update to every targeted matrix, which fills the pruned weights back in: the "
                  "sparsity below is the merged model's real one.",
    }[exported.kind]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {matrix_name} / {plan.cell.name}", "",
             " → ".join(stage.label for stage in plan.model.lineage()), "", notes, "",
             *([f"**Base weights.** {caveat}", ""]
               if (caveat := model_source(cfg.model).caveat) else []),
             "## Loading", "", "```python", "import peft, sparselab, transformers",
             f"model = {exported.loader}", "```", ""]
    if _structured(exported.folder):
        lines += ["Structurally pruned: each layer keeps its own number of heads and MLP "
                  "channels (`sparselab_shapes.json`), which transformers' config cannot "
                  "describe, so plain `from_pretrained` refuses this folder; "
                  "`sparselab.load_model` builds the shapes, then reads the weights.", ""]
    lines += ["## Sparsity of the exported weights", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in exported.sparsity.items()]
    lines += ["", "## Metrics of the cell", "",
              "From the cell's stage entries (the same numbers its MLflow run"
              + (f" `{run_id}`" if run_id else "") + " records).", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Configuration", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip(), "```", "",
              f"Exported by sparselab {__version__}; stage keys: "
              + ", ".join(f"{role} `{key}`" for role, key in stages.items()) + ".", ""]
    (exported.folder / "README.md").write_text("\n".join(lines))
