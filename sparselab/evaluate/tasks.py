"""The evaluation tasks: which lm-eval task each is, where its data comes from, its metric names.

Light on purpose (no torch, no lm-eval import): the validator checks tasks with it before anything
heavy runs. `harness.py` turns these definitions into lm-eval task configurations at run time.

Our three tasks (`squadv2`, `gsm8k`, `boolq`) read their data from the catalog: from a data
directory when one is given, else from the hub exactly as lm-eval does. Other lm-eval tasks listed
here run untouched and always read the hub (or the local Hugging Face caches when offline).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sparselab.data.catalog import DataSource
from sparselab.evaluate import squad_v2


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    name: our name, which is also the lm-eval task name (and the prefix of its metrics).
    lm_eval_dataset: the hub dataset lm-eval loads for it (`dataset_path`), for the offline check.
    dataset: the catalog dataset (`sparselab.registry.DATASETS`) that can stand in for the hub
        when a data directory is given; None for tasks that only read the hub.
    eval_split / fewshot_split: catalog splits of the scored examples and of the few-shot examples.
    default_fewshot: lm-eval's own num_fewshot for the task (used when the matrix leaves it null).
    lm_eval_yaml: the task's built-in YAML, relative to `lm_eval/tasks/` (None: a Python task).
    metrics: lm-eval result key ("metric,filter") -> our metric name (after "<name>."); each
        also gives "<metric>_stderr" where lm-eval has a standard error. Empty: every metric
        lm-eval reports, named "<metric>" (filter "none") or "<metric>_<filter>".
    """
    name: str
    lm_eval_dataset: str
    dataset: str | None = None
    eval_split: str | None = None
    fewshot_split: str | None = None
    default_fewshot: int = 0
    lm_eval_yaml: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)

    @property
    def local_capable(self) -> bool:
        return self.dataset is not None

    def fewshot(self, num_fewshot: int | None) -> int:
        return self.default_fewshot if num_fewshot is None else num_fewshot


SQUADV2 = TaskSpec(
    name="squadv2", lm_eval_dataset="lighteval/squad_v2", dataset="squad",
    eval_split="validation", fewshot_split="train", default_fewshot=0,
    lm_eval_yaml=None,  # a Python task (lm_eval/tasks/squadv2/task.py); harness.SQuADv2Task
    metrics={f"{m},none": m for m in (*squad_v2.QUESTION_METRICS, *squad_v2.CORPUS_METRICS)},
)

GSM8K = TaskSpec(
    name="gsm8k", lm_eval_dataset="openai/gsm8k", dataset="gsm8k",
    eval_split="test", fewshot_split="train", default_fewshot=5,
    lm_eval_yaml="gsm8k/gsm8k.yaml",
    metrics={"exact_match,flexible-extract": "exact_match",
             "exact_match,strict-match": "exact_match_strict"},
)

BOOLQ = TaskSpec(
    name="boolq", lm_eval_dataset="aps/super_glue", dataset="boolq",
    eval_split="validation", fewshot_split="train", default_fewshot=0,
    lm_eval_yaml="super_glue/boolq/default.yaml",
    metrics={"acc,none": "acc"},
)

# lm-eval tasks run as lm-eval defines them, from the hub only.
ARC_EASY = TaskSpec("arc_easy", "allenai/ai2_arc")
ARC_CHALLENGE = TaskSpec("arc_challenge", "allenai/ai2_arc")
HELLASWAG = TaskSpec("hellaswag", "Rowan/hellaswag")
PIQA = TaskSpec("piqa", "baber/piqa")
WINOGRANDE = TaskSpec("winogrande", "allenai/winogrande")
OPENBOOKQA = TaskSpec("openbookqa", "allenai/openbookqa")
LAMBADA_OPENAI = TaskSpec("lambada_openai", "EleutherAI/lambada_openai")


def task_spec(name: str) -> TaskSpec:
    from sparselab.registry import TASKS
    return TASKS.get(name)


# --- offline checks --------------------------------------------------------------------------

def hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or
                Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface").expanduser()


def hub_dataset_cached(repo_id: str) -> bool:
    """Whether a hub dataset is in the local hub cache or the `datasets` cache (best effort)."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or
               _hf_home() / "hub").expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or
                          _hf_home() / "datasets").expanduser()
    candidates = [hub / ("datasets--" + repo_id.replace("/", "--")),
                  datasets_cache / repo_id.replace("/", "___")]
    return any(path.is_dir() and any(path.iterdir()) for path in candidates)


# --- validation ------------------------------------------------------------------------------

def check_task(name: str, source: DataSource, num_fewshot: int | None) -> None:
    """Raise ValueError when task `name` cannot get its data from `source`."""
    from sparselab.registry import DATASETS
    spec = task_spec(name)
    shots = spec.fewshot(num_fewshot)
    if spec.local_capable and not source.is_hub:
        dataset = DATASETS.get(spec.dataset)()
        if not dataset.has_split(source, spec.eval_split):
            raise ValueError(f"task '{name}': {dataset.missing(source, spec.eval_split)}")
        if shots > 0 and not dataset.has_split(source, spec.fewshot_split):
            raise ValueError(
                f"task '{name}' with num_fewshot={shots} takes its few-shot examples from the "
                f"'{spec.fewshot_split}' split: {dataset.missing(source, spec.fewshot_split)} "
                "Add that file or set evaluate.num_fewshot: 0.")
        return
    if hub_offline() and not hub_dataset_cached(spec.lm_eval_dataset):
        if spec.local_capable:
            raise ValueError(
                f"task '{name}' reads '{spec.lm_eval_dataset}' from the Hugging Face hub, but the "
                "hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not in the local "
                "caches; set data_dir to a folder laid out like ../shared/data "
                "(or 'builtin' for the shipped fixtures).")
        ours = ", ".join(t.name for t in (SQUADV2, GSM8K, BOOLQ))
        raise ValueError(
            f"task '{name}' is an lm-eval task that reads '{spec.lm_eval_dataset}' from the "
            "Hugging Face hub, but the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and "
            f"it is not in the local caches; offline, only {ours} can read a data directory.")


def check_tasks(settings, source: DataSource) -> None:
    """Raise ValueError for the first task whose data is neither reachable nor local.

    `settings` is a `sparselab.matrix.TaskSettings` (`evaluate`). Hub data is only checked when
    the hub is offline (whether an online hub has it can't be known without asking it).
    """
    for name in settings.tasks:
        check_task(name, source, settings.num_fewshot)


def metric_name(spec: TaskSpec, key: str) -> str | None:
    """Our metric name for an lm-eval result key ("acc,none", "acc_stderr,none"); None: skip."""
    metric, _, filt = key.partition(",")
    stderr = metric.endswith("_stderr")
    base = metric[: -len("_stderr")] if stderr else metric
    if spec.metrics:
        ours = spec.metrics.get(f"{base},{filt}")
        if ours is None:
            return None
    else:
        if not filt or key == "alias":
            return None
        ours = base if filt == "none" else f"{base}_{filt}".replace("-", "_")
    return f"{spec.name}.{ours}" + ("_stderr" if stderr else "")
