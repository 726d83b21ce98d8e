"""The `tasks` evaluation stage: lm-eval tasks on the in-memory model, online or from local files.

`evaluate_tasks` runs `lm_eval.simple_evaluate` on an `HFLM` wrapping the model object the stage
chain holds (a peft-wrapped model too) with the run's tokenizer. Task configurations are generated
at run time into a temporary folder that lm-eval reads with `TaskManager(include_path=...)`:

- each YAML task is a file that `include:`s lm-eval's own YAML for the task, so prompts, filters,
  metrics and generation settings stay exactly as lm-eval defines them;
- with a data directory the file also points lm-eval at local files (`dataset_path: json`), which
  are first converted from the catalog into the hub's row shape;
- `squadv2` is lm-eval's Python task (`SQuADv2Task` below subclasses it: same prompt, same
  requests) scored by `sparselab.evaluate.squad_v2` instead of `evaluate.load("squad_v2")`, which
  needs the hub.

The same folder works with the command line (`lm_eval --include_path FOLDER/tasks ...`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
from pathlib import Path
from typing import Any

import datasets
import lm_eval
import yaml
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks.squadv2.task import SQuAD2

try:
    from lm_eval.config.task import TaskConfig
except ImportError:  # older lm-eval keeps it in lm_eval.api.task
    from lm_eval.api.task import TaskConfig

from sparselab.data.catalog import DataSource
from sparselab.evaluate import squad_v2
from sparselab.evaluate.examples import ExampleScores, example_id, fingerprint
from sparselab.evaluate.tasks import SQUADV2, TaskSpec, check_tasks, metric_name, task_spec
from sparselab.matrix import sample_indices
from sparselab.registry import DATASETS

log = logging.getLogger("sparselab")

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
TASKS_SUBDIR = "tasks"  # the include_path inside a prepared folder

_List = getattr(datasets, "List", datasets.Sequence)  # datasets < 4 has only Sequence
SQUAD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": {"text": _List(datasets.Value("string")),
                "answer_start": _List(datasets.Value("int32"))},
})

# --- squadv2 with our scorer -----------------------------------------------------------------

class SQuADv2Task(SQuAD2):
    """lm-eval's `squadv2` (same prompt, same generation and loglikelihood requests), offline.

    - `exact`, `f1`, their `HasAns_*`/`NoAns_*` splits and `best_exact`/`best_f1` follow lm-eval's
      rule: the generated text is the prediction, so on an unanswerable question only an empty
      generation scores (saying "unanswerable" scores 0), and the best_* sweep abstains by the
      no-answer probability (exp of the loglikelihood of " unanswerable"). They equal the
      `lm_eval` command line's numbers.
    - `exact_abstain`, `f1_abstain`, `NoAns_*_abstain` count the generation "unanswerable" (the word
      lm-eval's few-shot targets teach) as an abstention. `HasAns_*` are the same under both rules:
      an abstention on an answerable question scores 0 either way.
    - Per-question scores are in percent and averaged (so each gets a standard error); the mean
      equals the official corpus score.
    - Given `dataset_path: json` and `dataset_kwargs` (local files), it reads those instead of the
      hub; a missing `train` split just means there are no few-shot examples.
    """

    def __init__(self, config: dict | None = None):
        names = {f.name for f in dataclasses.fields(TaskConfig)}
        cfg = {k: v for k, v in (config or {}).items() if k in names}
        cfg["metadata"] = {**(cfg.get("metadata") or {}), "version": self.VERSION}
        cfg.setdefault("task", "squadv2")
        ConfigurableTask.__init__(self, config=cfg)

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs) -> None:
        if self.DATASET_PATH == "json":
            self.dataset = datasets.load_dataset("json", features=SQUAD_FEATURES,
                                                 **(dataset_kwargs or {}))
        else:
            super().download(dataset_kwargs, **kwargs)

    def has_training_docs(self) -> bool:
        return "train" in self.dataset

    def process_results(self, doc: dict, results: list) -> dict[str, Any]:
        continuation, (logprob_unanswerable, _) = results
        answers = list(doc["answers"]["text"])
        split = "HasAns" if answers else "NoAns"
        exact, f1 = squad_v2.score(answers, continuation)
        out = {"exact": 100.0 * exact, "f1": 100.0 * f1,
               f"{split}_exact": 100.0 * exact, f"{split}_f1": 100.0 * f1}
        exact, f1 = squad_v2.score(answers, squad_v2.abstain_unanswerable(continuation))
        out.update({"exact_abstain": 100.0 * exact, "f1_abstain": 100.0 * f1})
        if not answers:
            out.update({"NoAns_exact_abstain": 100.0 * exact, "NoAns_f1_abstain": 100.0 * f1})
        item = {"id": doc["id"], "prediction_text": continuation, "answers": answers,
                "no_answer_probability": math.exp(logprob_unanswerable)}
        return {**out, "best_exact": item, "best_f1": item}

    def aggregation(self) -> dict[str, Any]:
        return {**{name: mean for name in squad_v2.QUESTION_METRICS},
                "best_exact": _best("best_exact"), "best_f1": _best("best_f1")}

    def higher_is_better(self) -> dict[str, bool]:
        return {name: True for name in (*squad_v2.QUESTION_METRICS, *squad_v2.CORPUS_METRICS)}


def _best(key: str):
    def aggregate(items: list[dict[str, Any]]) -> float:
        scores = squad_v2.squad_v2_scores(
            {i["id"]: i["prediction_text"] for i in items},
            {i["id"]: i["answers"] for i in items},
            na_probs={i["id"]: i["no_answer_probability"] for i in items})
        return scores[key]
    aggregate.__name__ = key
    return aggregate


# --- task configurations ---------------------------------------------------------------------

def _rows(spec: TaskSpec, source: DataSource, split: str) -> list[dict[str, Any]]:
    """The catalog's records of a split, in the row shape lm-eval's task reads from the hub."""
    records = DATASETS.get(spec.dataset)().records(source, split)
    if spec.dataset == "squad":
        return [{"id": r["id"], "title": r["title"], "context": r["context"],
                 "question": r["question"],
                 "answers": {"text": list(r["answers"]["text"]),
                             "answer_start": [int(a) for a in r["answers"]["answer_start"]]}}
                for r in records]
    if spec.dataset == "boolq":  # super_glue/boolq: label 0 = False, 1 = True
        return [{"question": r["question"], "passage": r["passage"],
                 "idx": int(r.get("idx", i)), "label": int(r["label"])}
                for i, r in enumerate(records)]
    return [{"question": r["question"], "answer": r["answer"]} for r in records]  # gsm8k


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _local_overrides(spec: TaskSpec, source: DataSource, folder: Path,
                     num_fewshot: int | None) -> dict[str, Any]:
    """Config keys that point the task at converted local files instead of the hub."""
    dataset = DATASETS.get(spec.dataset)()
    splits = [spec.eval_split]
    with_fewshot = spec.fewshot(num_fewshot) > 0 and dataset.has_split(source, spec.fewshot_split)
    if with_fewshot:
        splits.append(spec.fewshot_split)
    files = {}
    for split in splits:
        path = folder / "data" / spec.name / f"{split}.jsonl"
        _write_jsonl(path, _rows(spec, source, split))
        files[split] = str(path)
    overrides: dict[str, Any] = {
        "dataset_path": "json", "dataset_name": None,
        # the Arrow cache of the converted files lives and dies with the folder
        "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "hf_cache")},
    }
    if not with_fewshot and spec.lm_eval_yaml is not None:
        # no few-shot examples are read (the split may not even exist locally)
        overrides.update(training_split=None, fewshot_split=None)
    return overrides


def prepare_tasks(names: list[str], source: DataSource, folder: Path,
                  num_fewshot: int | None = None) -> Path:
    """Write lm-eval task configurations (and converted data) for `names` into `folder`.

    Returns the folder to give lm-eval as `include_path` (`folder/tasks`). Tasks without a
    catalog dataset (lm-eval's own, e.g. arc_easy) get no file: lm-eval's built-in config is used.
    """
    include = folder / TASKS_SUBDIR
    include.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = task_spec(name)
        if not spec.local_capable:
            continue
        config: dict[str, Any] = {"task": spec.name}
        if spec.lm_eval_yaml is not None:
            config = {"include": str(LM_EVAL_TASKS / spec.lm_eval_yaml), **config}
        if not source.is_hub:
            config.update(_local_overrides(spec, source, folder, num_fewshot))
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        if spec is SQUADV2:  # a Python task: lm-eval builds it from the class
            text = f"class: !function {SQuADv2Task.__module__}.SQuADv2Task\n" + text
        (include / f"{spec.name}.yaml").write_text(text, encoding="utf-8")
    return include


# --- running ---------------------------------------------------------------------------------

def run_lm_eval(loaded, tasks: list[str], include_path: Path, *, num_fewshot: int | None,
                limit: int | None, batch_size: int, seed: int,
                gen_kwargs: dict[str, Any] | None = None, sample: str = "first"
                ) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on the in-memory model; returns lm-eval's results (with samples).

    `gen_kwargs` overrides generation settings (tests use it to shorten generations); the stage
    leaves it None so lm-eval's task defaults apply. `sample: random` scores `limit` documents
    of each task drawn with `seed` (lm-eval's `samples`) instead of the first `limit`. Random
    states are restored afterwards.
    """
    import numpy as np
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval's built-in index (~15k configs, 20-30 s to build) is only needed for its own tasks
    needs_defaults = any(not task_spec(t).local_capable for t in tasks)
    manager = TaskManager(include_path=str(include_path), include_defaults=needs_defaults)
    # HFLM's own cap applies to requests that set none (squadv2's), so it follows gen_kwargs too
    cap = {"max_gen_toks": int(gen_kwargs["max_gen_toks"])} \
        if gen_kwargs and "max_gen_toks" in gen_kwargs else {}
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, **cap)
    from sparselab.onload import execution_device, onloading
    if onloading():  # HFLM takes its device from the weights, which stay on the host
        lm._device = execution_device(loaded.model)
    chosen = None
    if sample == "random" and limit is not None:
        from lm_eval.tasks import get_task_dict
        sizes = {name: len(task.eval_docs) for name, task in
                 get_task_dict(list(tasks), manager).items()}
        chosen = {name: sample_indices(size, limit, sample, seed) for name, size in sizes.items()}
        limit = None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, samples=chosen,
                batch_size=batch_size, task_manager=manager, log_samples=True,
                gen_kwargs=gen_kwargs, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def extract_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    """lm-eval's results -> our metric names (README, "What the numbers are"), numeric values only."""
    metrics: dict[str, float] = {}
    for name in tasks:
        spec = task_spec(name)
        for key, value in results["results"].get(name, {}).items():
            ours = metric_name(spec, key)
            if ours is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metrics[ours] = float(value)
    return metrics


def example_scores(results: dict[str, Any], tasks: list[str]) -> ExampleScores:
    """Each logged sample's numeric scores under our metric names, keyed `<task>/doc/<doc_id>`
    (a metric a sample lacks, e.g. HasAns_f1 of an unanswerable question, is left out). lm-eval
    scores lie in [0, 1], our SQuAD v2 scorer's in percent."""
    scores = ExampleScores()
    for name in tasks:
        spec = task_spec(name)
        rows = (results.get("samples") or {}).get(name, [])
        scored = fingerprint("".join(row["doc_hash"] + row["prompt_hash"] + row["target_hash"]
                                     for row in rows).encode())  # lm-eval's task hash
        for row in rows:
            for metric in row["metrics"]:
                value = row.get(metric)
                ours = metric_name(spec, f"{metric},{row['filter']}")
                if ours is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                scores.add(ours, [example_id(name, "doc", row["doc_id"])], [value],
                           full_score=100.0 if spec is SQUADV2 else 1.0, fingerprint=scored)
    return scores


def write_artifacts(results: dict[str, Any], artifacts: Path) -> list[Path]:
    """lm-eval's results JSON and one per-sample jsonl per task, as its command line writes them."""
    from lm_eval.utils import handle_non_serializable, hash_string, sanitize_list
    artifacts.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    samples = results.pop("samples", None) or {}
    results["task_hashes"] = {
        task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                  for s in rows))
        for task, rows in samples.items()}
    written = [artifacts / "lm_eval_results.json"]
    written[0].write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                     ensure_ascii=False), encoding="utf-8")
    for task, rows in samples.items():
        path = artifacts / f"lm_eval_samples_{task}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                row = {**row,
                       "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                                     for i, arg in enumerate(row["arguments"])},
                       "resps": sanitize_list(row["resps"]),
                       "filtered_resps": sanitize_list(row["filtered_resps"]),
                       "target": str(row["target"])}
                handle.write(json.dumps(row, default=handle_non_serializable,
                                        ensure_ascii=False) + "\n")
        written.append(path)
    return written


def evaluate_tasks(loaded, settings, source: DataSource, artifacts: Path) -> dict[str, float]:
    """Run the tasks of `settings` (the `tasks` stage's `sparselab.matrix.TaskSettings`: tasks,
    num_fewshot, limit, sample, batch_size, gen_kwargs, seed) on `loaded` (a
    `sparselab.models.LoadedModel`).

    Writes lm-eval's results and samples into `artifacts` and returns the metrics named as the
    README lists them (`squadv2.exact`, `gsm8k.exact_match`, `boolq.acc`, ... with
    `<name>_stderr` where lm-eval gives one).
    """
    if not settings.tasks:
        return {}
    check_tasks(settings, source)
    with tempfile.TemporaryDirectory(prefix="sparselab-tasks-") as tmp:
        include = prepare_tasks(settings.tasks, source, Path(tmp), settings.num_fewshot)
        log.info("tasks %s (limit=%s, num_fewshot=%s, data=%s)", ",".join(settings.tasks),
                 settings.limit, settings.num_fewshot, source.label)
        results = run_lm_eval(loaded, settings.tasks, include, num_fewshot=settings.num_fewshot,
                              limit=settings.limit, batch_size=settings.batch_size,
                              seed=settings.seed, gen_kwargs=settings.gen_kwargs or None,
                              sample=settings.sample)
    write_artifacts(results, artifacts)
    example_scores(results, settings.tasks).write(artifacts)
    return extract_metrics(results, settings.tasks)
