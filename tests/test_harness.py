"""The `tasks` evaluation stage: lm-eval tasks on tiny-llama from small local data.

One in-process run of the three tasks (limit 4) is shared by the tests; BoolQ and GSM8K are also
run through lm-eval's own command line on the saved model with the generated task configs, and
must give the same numbers and the same per-sample outputs. Generations are cut to 16 tokens for
GSM8K through `gen_kwargs` (tests only; the stage keeps lm-eval's defaults).
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparselab.data.catalog import DataSource, resolve_data_dir
from sparselab.matrix import CellConfig, Evaluate

REPO = Path(__file__).resolve().parents[1]
LIMIT = 4
GEN_KWARGS = {"max_gen_toks": 16}
SQUAD_NAMES = {f"squadv2.{m}" for m in
               ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1",
                "exact_abstain", "f1_abstain", "NoAns_exact_abstain", "NoAns_f1_abstain")}
SQUAD_CORPUS = {"squadv2.best_exact", "squadv2.best_f1"}  # a threshold sweep: no stderr


# --- a small data directory in the layout of ../shared/data ----------------------------------

def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_data_dir(root: Path) -> Path:
    passage = ("Lake Tana -- Lake Tana is the source of the Blue Nile and the largest lake in "
               "Ethiopia. It lies in the northwest highlands and holds many islands.")
    _jsonl(root / "boolq" / "val.jsonl", [  # SuperGLUE rows: label is the string "true"/"false"
        {"question": f"is lake tana in ethiopia {i}", "passage": passage, "idx": i,
         "label": "true" if i % 2 == 0 else "false"} for i in range(6)])
    _jsonl(root / "gsm8k" / "test.jsonl", [
        {"question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
         "answer": f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
        for a, b in [(3, 4), (10, 5), (7, 8), (1, 1), (6, 2)]])
    _jsonl(root / "gsm8k" / "train.jsonl", [
        {"question": f"A box holds {a} pens. How many pens are in {b} boxes?",
         "answer": f"{b} boxes hold {a} * {b} = <<{a}*{b}={a * b}>>{a * b} pens.\n#### {a * b}"}
        for a, b in [(2, 3), (4, 5), (6, 2), (3, 3), (5, 5), (7, 2)]])
    context = ("Denver won the game against Carolina. The final score was 24 to 10, and the "
               "game was played in Santa Clara.")
    qas = [
        {"id": "q1", "question": "Who won the game?", "is_impossible": False,
         "answers": [{"text": "Denver", "answer_start": 0}]},
        {"id": "q2", "question": "Who sang the anthem?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "Carolina", "answer_start": 29}]},
        {"id": "q3", "question": "Where was the game played?", "is_impossible": False,
         "answers": [{"text": "Santa Clara", "answer_start": 89},
                     {"text": "in Santa Clara", "answer_start": 86}]},
        {"id": "q4", "question": "How long did the game last?", "is_impossible": True,
         "answers": [], "plausible_answers": []},
        {"id": "q5", "question": "What was the final score?", "is_impossible": False,
         "answers": [{"text": "24 to 10", "answer_start": 54}]},
    ]
    dev = {"version": "v2.0", "data": [{"title": "Super_Bowl", "paragraphs": [
        {"context": context, "qas": qas}]}]}
    (root / "squad_v2").mkdir(parents=True, exist_ok=True)
    (root / "squad_v2" / "dev-v2.0.json").write_text(json.dumps(dev), encoding="utf-8")
    return root


def settings_for(tasks: list[str], **evaluate) -> Evaluate:
    """The `evaluate` section of a cell, its seed filled in as a cell fills it."""
    return CellConfig(model="tiny-llama", seed=0, evaluate={
        "tasks": tasks, "limit": LIMIT, "batch_size": 2, "perplexity": None, **evaluate}).evaluate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> DataSource:
    return resolve_data_dir(str(make_data_dir(tmp_path_factory.mktemp("data"))))


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    from sparselab.models import load_model
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def run(tiny_loaded, data_dir, tmp_path_factory):
    """The three tasks in one in-process run; `evaluate.load` (needs the hub) must not be used."""
    import evaluate

    from sparselab.evaluate.harness import evaluate_tasks

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate.load called: the SQuAD metric must not need the hub")

    artifacts = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "load", refuse)
        metrics = evaluate_tasks(tiny_loaded, settings_for(["squadv2", "gsm8k", "boolq"],
                                                           gen_kwargs=GEN_KWARGS),
                                 data_dir, artifacts)
    return metrics, artifacts


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- end to end ------------------------------------------------------------------------------

def test_metric_names_and_ranges(run):
    metrics, _ = run
    values = {k: v for k, v in metrics.items() if not k.endswith("_stderr")}
    assert set(values) == SQUAD_NAMES | SQUAD_CORPUS | {"gsm8k.exact_match",
                                                        "gsm8k.exact_match_strict", "boolq.acc"}
    # every split has at least two questions, so every averaged metric has a standard error
    assert {k for k in metrics if k.endswith("_stderr")} == {
        k + "_stderr" for k in values if k not in SQUAD_CORPUS}
    for name, value in metrics.items():
        assert math.isfinite(value), name
        top = 100.0 if name.startswith("squadv2.") else 1.0
        assert 0.0 <= value <= top, (name, value)


def test_artifacts_hold_results_and_samples(run):
    metrics, artifacts = run
    results = json.loads((artifacts / "lm_eval_results.json").read_text())
    assert set(results["results"]) == {"squadv2", "gsm8k", "boolq"}
    assert results["results"]["boolq"]["acc,none"] == metrics["boolq.acc"]
    assert results["n-samples"]["gsm8k"]["effective"] == LIMIT
    for task in ("squadv2", "gsm8k", "boolq"):
        rows = _samples(artifacts / f"lm_eval_samples_{task}.jsonl")
        assert {row["doc_id"] for row in rows} == set(range(LIMIT))
    squad = _samples(artifacts / "lm_eval_samples_squadv2.jsonl")
    # the local dev file was flattened into the hub's row shape, in file order
    assert [row["doc"]["id"] for row in squad] == ["q1", "q2", "q3", "q4"]
    assert squad[2]["doc"]["answers"] == {"text": ["Santa Clara", "in Santa Clara"],
                                          "answer_start": [89, 86]}
    # lm-eval's prompt and requests: a generation until "\n" and the " unanswerable" loglikelihood
    args = squad[0]["arguments"]
    assert args["gen_args_0"]["arg_0"].endswith("Question: Who won the game?\n\nAnswer:")
    assert args["gen_args_0"]["arg_1"] == {"until": ["\n"]}
    assert args["gen_args_1"]["arg_1"] == " unanswerable"


def test_squad_scores_follow_our_scorer(run):
    """The reported scores are the official rules applied to the logged generations: as they
    are (lm-eval's rule, best_* swept over the no-answer probability), and with "unanswerable"
    read as an abstention (the *_abstain names)."""
    from sparselab.evaluate.squad_v2 import abstain_unanswerable, squad_v2_scores
    metrics, artifacts = run
    rows = _samples(artifacts / "lm_eval_samples_squadv2.jsonl")
    golds = {r["doc"]["id"]: r["doc"]["answers"]["text"] for r in rows}
    na_probs = {r["doc"]["id"]: math.exp(float(r["resps"][1][0][0])) for r in rows}  # as logged
    generated = {r["doc"]["id"]: r["filtered_resps"][0] for r in rows}
    standard = squad_v2_scores(generated, golds, na_probs=na_probs)
    abstained = squad_v2_scores({q: abstain_unanswerable(g) for q, g in generated.items()}, golds)
    for name in SQUAD_NAMES | SQUAD_CORPUS:
        metric = name.split(".", 1)[1]
        if metric.endswith("_abstain"):
            expected = abstained[metric.removesuffix("_abstain")]
        else:
            expected = standard[metric]
        assert metrics[name] == pytest.approx(expected), name


def test_boolq_and_gsm8k_match_the_lm_eval_command_line(run, tiny_model_dir, data_dir,
                                                        tmp_path):
    from sparselab.evaluate.harness import prepare_tasks
    metrics, artifacts = run
    include = prepare_tasks(["boolq", "gsm8k"], data_dir, tmp_path / "prepared")
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={tiny_model_dir},dtype=float32", "--device", "cpu",
               "--tasks", "boolq,gsm8k", "--include_path", str(include),
               "--limit", str(LIMIT), "--batch_size", "2", "--seed", "0",
               "--gen_kwargs", "max_gen_toks=16", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = json.loads(Path(glob.glob(str(out / "*" / "results_*.json"))[0]).read_text())["results"]
    assert metrics["boolq.acc"] == cli["boolq"]["acc,none"]
    assert metrics["boolq.acc_stderr"] == cli["boolq"]["acc_stderr,none"]
    assert metrics["gsm8k.exact_match"] == cli["gsm8k"]["exact_match,flexible-extract"]
    assert metrics["gsm8k.exact_match_stderr"] == \
        cli["gsm8k"]["exact_match_stderr,flexible-extract"]
    assert metrics["gsm8k.exact_match_strict"] == cli["gsm8k"]["exact_match,strict-match"]
    # the same prompts and the same model outputs, sample by sample
    for task in ("boolq", "gsm8k"):
        ours = _samples(artifacts / f"lm_eval_samples_{task}.jsonl")
        theirs = _samples(Path(glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))[0]))
        key = lambda r: (r["doc_id"], r["filter"])  # noqa: E731
        ours, theirs = sorted(ours, key=key), sorted(theirs, key=key)
        assert [r["arguments"] for r in ours] == [r["arguments"] for r in theirs]
        assert [r["resps"] for r in ours] == [r["resps"] for r in theirs]
        assert [r["filtered_resps"] for r in ours] == [r["filtered_resps"] for r in theirs]


def test_peft_wrapped_model(tiny_model_dir, data_dir, run, tmp_path):
    """A LoRA-wrapped model runs too; a fresh adapter (B = 0) changes nothing."""
    from peft import LoraConfig, get_peft_model

    from sparselab.evaluate.harness import evaluate_tasks
    from sparselab.models import LoadedModel, load_model
    base = load_model(tiny_model_dir)
    wrapped = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()
    metrics = evaluate_tasks(LoadedModel(wrapped, base.tokenizer), settings_for(["boolq"]), data_dir,
                             tmp_path)
    assert metrics["boolq.acc"] == run[0]["boolq.acc"]
    ours = _samples(tmp_path / "lm_eval_samples_boolq.jsonl")
    before = _samples(run[1] / "lm_eval_samples_boolq.jsonl")
    assert [r["resps"] for r in ours] == [r["resps"] for r in before]


# --- task configurations and checks (no model) -----------------------------------------------

def test_local_configs_convert_to_hub_rows(data_dir, tmp_path):
    import yaml

    from sparselab.evaluate.harness import LM_EVAL_TASKS, prepare_tasks
    include = prepare_tasks(["boolq", "gsm8k", "squadv2"], data_dir, tmp_path, num_fewshot=0)
    boolq = yaml.safe_load((include / "boolq.yaml").read_text())
    assert boolq["include"] == str(LM_EVAL_TASKS / "super_glue" / "boolq" / "default.yaml")
    assert boolq["dataset_path"] == "json" and boolq["dataset_name"] is None
    assert boolq["training_split"] is None  # no BoolQ train split in the data directory
    rows = _samples(Path(boolq["dataset_kwargs"]["data_files"]["validation"]))
    assert rows[0] == {"question": "is lake tana in ethiopia 0",
                       "passage": rows[0]["passage"], "idx": 0, "label": 1}
    assert [r["label"] for r in rows[:2]] == [1, 0]
    gsm8k = yaml.safe_load((include / "gsm8k.yaml").read_text())
    assert set(gsm8k["dataset_kwargs"]["data_files"]) == {"test"}  # 0-shot: no train needed
    assert gsm8k["fewshot_split"] is None
    squad_text = (include / "squadv2.yaml").read_text()
    assert squad_text.startswith("class: !function sparselab.evaluate.harness.SQuADv2Task\n")
    squad = _samples(tmp_path / "data" / "squadv2" / "validation.jsonl")
    assert squad[1] == {"id": "q2", "title": "Super_Bowl", "context": squad[1]["context"],
                        "question": "Who sang the anthem?",
                        "answers": {"text": [], "answer_start": []}}


def test_hub_configs_are_lm_evals_own(tmp_path):
    import yaml

    from sparselab.evaluate.harness import LM_EVAL_TASKS, prepare_tasks
    include = prepare_tasks(["gsm8k", "squadv2", "arc_easy"], DataSource(None, "hub"), tmp_path)
    assert yaml.safe_load((include / "gsm8k.yaml").read_text()) == {
        "include": str(LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml"), "task": "gsm8k"}
    assert "dataset_path" not in (include / "squadv2.yaml").read_text()
    assert not (include / "arc_easy.yaml").exists()  # lm-eval's built-in config is used


SQUAD_CASES = [  # (gold answers, generation, loglikelihood of " unanswerable")
    ([], " Unanswerable", math.log(0.25)),   # says the word lm-eval's targets teach
    ([], "", math.log(0.9)),                 # an empty generation: the only abstention lm-eval sees
    ([], " Denver", math.log(0.05)),
    (["Denver Broncos"], " Broncos", -3.0),
    (["Denver Broncos", "the Broncos"], " The Broncos.", math.log(0.3)),
    (["Santa Clara"], " unanswerable", math.log(0.6)),
]


def test_squad_scores_follow_lm_evals_rule_and_the_abstention_variant(monkeypatch):
    """Our SQuADv2Task against lm-eval's own SQuAD2 task, whose corpus metric (evaluate's
    `squad_v2`, the official script with no-answer threshold 1.0) is the official rules here."""
    import lm_eval.tasks.squadv2.task as lm_eval_squad

    from sparselab.evaluate import squad_v2
    from sparselab.evaluate.harness import SQuADv2Task

    def official(predictions, references):
        return squad_v2.squad_v2_scores(
            {p["id"]: p["prediction_text"] for p in predictions},
            {r["id"]: list(r["answers"]["text"]) for r in references},
            na_probs={p["id"]: p["no_answer_probability"] for p in predictions})

    monkeypatch.setattr(lm_eval_squad, "_squad_metric", official)
    theirs = lm_eval_squad.SQuAD2.__new__(lm_eval_squad.SQuAD2)  # process_results needs no data
    ours = SQuADv2Task.__new__(SQuADv2Task)
    docs = [{"id": f"q{i}", "answers": {"text": gold, "answer_start": [0] * len(gold)}}
            for i, (gold, _, _) in enumerate(SQUAD_CASES)]
    results = [[text, (logprob, False)] for _, text, logprob in SQUAD_CASES]
    per_doc = [(theirs.process_results(d, r), ours.process_results(d, r))
               for d, r in zip(docs, results)]
    for name in (*squad_v2.QUESTION_METRICS[:6], *squad_v2.CORPUS_METRICS):
        lm_eval_value = theirs.aggregation()[name]([t[name] for t, _ in per_doc if name in t])
        our_value = ours.aggregation()[name]([o[name] for _, o in per_doc if name in o])
        assert our_value == pytest.approx(lm_eval_value), name
    # by hand: lm-eval credits only the empty generation on the 3 unanswerable questions
    scores = {name: ours.aggregation()[name]([o[name] for _, o in per_doc if name in o])
              for name in squad_v2.QUESTION_METRICS}
    assert scores["NoAns_exact"] == pytest.approx(100 / 3)
    assert scores["NoAns_exact_abstain"] == pytest.approx(200 / 3)  # "Unanswerable" abstains too
    assert scores["HasAns_exact"] == pytest.approx(100 / 3)  # "The Broncos." = "the Broncos"
    assert scores["HasAns_f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert scores["exact"] == pytest.approx(100 * 2 / 6)
    assert scores["exact_abstain"] == pytest.approx(100 * 3 / 6)
    assert "HasAns_exact" not in per_doc[0][1] and "NoAns_exact_abstain" not in per_doc[3][1]


def test_check_tasks_names_the_missing_file(tmp_path):
    from sparselab.evaluate.tasks import check_tasks
    folder = make_data_dir(tmp_path / "data")
    (folder / "gsm8k" / "train.jsonl").unlink()
    (folder / "boolq" / "val.jsonl").unlink()
    source = resolve_data_dir(str(folder))
    check_tasks(settings_for(["squadv2"]), source)
    check_tasks(settings_for(["gsm8k"], num_fewshot=0), source)
    with pytest.raises(ValueError, match=r"num_fewshot=5 .*'train'.*gsm8k/train\.jsonl"):
        check_tasks(settings_for(["gsm8k"]), source)  # lm-eval's gsm8k is 5-shot by default
    with pytest.raises(ValueError, match=r"'boolq'.*boolq/val\.jsonl.*boolq/dev\.jsonl"):
        check_tasks(settings_for(["boolq"]), source)
    with pytest.raises(ValueError, match=r"boolq.*num_fewshot=1.*boolq/train\.jsonl"):
        check_tasks(settings_for(["boolq"], num_fewshot=1), resolve_data_dir(str(
            make_data_dir(tmp_path / "full"))))


def test_check_tasks_offline_hub(tmp_path, monkeypatch):
    from sparselab.evaluate.tasks import check_tasks
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    hub = DataSource(None, "hub")
    with pytest.raises(ValueError, match=r"'boolq' reads 'aps/super_glue'.*offline.*data_dir"):
        check_tasks(settings_for(["boolq"]), hub)
    local = resolve_data_dir(str(make_data_dir(tmp_path / "data")))
    with pytest.raises(ValueError, match=r"'arc_easy' is an lm-eval task.*only squadv2, gsm8k"):
        check_tasks(settings_for(["squadv2", "arc_easy"]), local)
    # in the local datasets cache it is allowed (best effort: lm-eval reads it from there)
    cached = tmp_path / "empty_hf_home" / "datasets" / "allenai___ai2_arc"
    cached.mkdir(parents=True)
    (cached / "ARC-Easy").mkdir()
    check_tasks(settings_for(["arc_easy"]), local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    check_tasks(settings_for(["boolq", "hellaswag"]), hub)  # online: can't know, so allowed


def test_per_example_scores_add_up_to_lm_evals_metrics(run):
    from sparselab.evaluate.examples import ExampleScores
    metrics, artifacts = run
    scores = ExampleScores.read(artifacts / "examples.json")
    for name in ("boolq.acc", "gsm8k.exact_match", "gsm8k.exact_match_strict", "squadv2.f1",
                 "squadv2.exact", "squadv2.HasAns_f1", "squadv2.NoAns_exact"):
        assert scores.value(name) == pytest.approx(metrics[name]), name
    assert set(scores.scores["boolq.acc"]) == {f"boolq/doc/{i}" for i in range(LIMIT)}
    assert scores.full_score["squadv2.f1"] == 100.0 and scores.full_score["boolq.acc"] == 1.0
    assert len(set(scores.fingerprint[m] for m in ("boolq.acc", "squadv2.f1"))) == 2


def test_random_sample_scores_seeded_documents(tiny_loaded, data_dir, tmp_path):
    """`evaluate.sample: random` scores `limit` documents drawn with the seed, not the first."""
    from sparselab.evaluate.examples import ExampleScores
    from sparselab.evaluate.harness import evaluate_tasks
    from sparselab.matrix import sample_indices
    settings = settings_for(["boolq"], limit=3, sample="random", seed=5)
    metrics = evaluate_tasks(tiny_loaded, settings, data_dir, tmp_path)
    drawn = sample_indices(6, 3, "random", 5)
    assert drawn != [0, 1, 2] and drawn == sorted(drawn)
    scores = ExampleScores.read(tmp_path / "examples.json")
    assert set(scores.scores["boolq.acc"]) == {f"boolq/doc/{i}" for i in drawn}
    assert scores.value("boolq.acc") == pytest.approx(metrics["boolq.acc"])
    assert sample_indices(6, 3, "first", 5) == [0, 1, 2]
    assert sample_indices(6, None, "random", 5) == list(range(6))
