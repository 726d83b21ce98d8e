"""The answer-loss evaluation: the score, its stage, and its bad input."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from sparselab.cli import main
from sparselab.data.catalog import resolve_data_dir
from sparselab.evaluate.answer_loss import answer_loss
from sparselab.registry import DATASETS

from conftest import write

MATRIX = """
name: answers
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: magnitude, sparsity: 0.5}
  recover: {method: none}
  evaluate:
    perplexity: null
    tasks: []
    answer_loss: {data: [gsm8k, squad], limit: 3, seqlen: 128, batch_size: 2}
experiments:
  a: {prune.sparsity: 0.5}
"""


def _direct(model, tokenizer, prompt: str, answer: str) -> list[float]:
    """Loss of each answer token and then the closing eos, one example at a time, no padding."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)  # float64, as scored
    first = len(bos) + len(prompt_ids)
    return [-logprobs[i - 1, ids[0, i]].item() for i in range(first, ids.shape[1])]


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1) / len(values))


def test_answer_loss_matches_a_direct_computation(tiny):
    gsm8k = DATASETS.get("gsm8k")()
    examples = gsm8k.examples(resolve_data_dir("builtin"), gsm8k.eval_split)[:3]
    result = answer_loss(tiny.model, tiny.tokenizer, examples, seqlen=256, batch_size=2)
    direct = [_direct(tiny.model, tiny.tokenizer, p, a) for p, a in examples]
    expected = {"answer_nll": [sum(d) / len(d) for d in direct],
                "answer_text_nll": [sum(d[:-1]) / len(d[:-1]) for d in direct],
                "answer_eos_nll": [d[-1] for d in direct]}
    for name, values in expected.items():
        mean, stderr = _mean_and_stderr(values)
        assert result[name] == pytest.approx(mean, rel=1e-6), name
        assert result[name + "_stderr"] == pytest.approx(stderr, rel=1e-3), name
    assert result["answer_examples"] == 3
    assert result["answer_tokens"] == sum(len(d) for d in direct)


def test_answer_loss_stage_logs_metrics_and_keeps_other_keys(workspace):
    from sparselab.matrix import expand, load_matrix
    from sparselab.stages import plan_cell
    from sparselab.validate import source_of
    path = write(workspace / "m.yaml", MATRIX)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    exp = client.get_experiment_by_name("answers")
    run = next(r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("sparselab.cell") == "a")
    for name in ("gsm8k.answer_nll", "squad.answer_nll", "time.evaluate_s"):
        assert name in run.data.metrics, name
    assert float(run.data.tags["sparselab.stderr.gsm8k.answer_nll"]) > 0
    assert run.data.metrics["gsm8k.answer_examples"] == 3
    # per-example losses, keyed by the example's place in the split, add up to the metric
    from sparselab.evaluate.examples import ExampleScores
    scores = ExampleScores.read(client.download_artifacts(
        run.info.run_id, "stages/answer_loss/examples.json", str(workspace)))
    assert list(scores.scores["gsm8k.answer_nll"]) == [f"gsm8k/example/{i}" for i in range(3)]
    for name in ("gsm8k.answer_nll", "squad.answer_text_nll", "squad.answer_eos_nll"):
        assert scores.value(name) == pytest.approx(run.data.metrics[name]), name
    # sample: random scores seeded examples of the split, under their own indices
    from sparselab.matrix import sample_indices
    drawn = write(workspace / "r.yaml", MATRIX.replace("limit: 3,", "limit: 3, sample: random,"
                                                       " seed: 1,").replace("answers", "drawn"))
    assert CliRunner().invoke(main, ["run", str(drawn)]).exit_code == 0
    exp = client.get_experiment_by_name("drawn")
    run = next(r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("sparselab.cell") == "a")
    scores = ExampleScores.read(client.download_artifacts(
        run.info.run_id, "stages/answer_loss/examples.json", str(workspace / "drawn")))
    total = len(DATASETS.get("gsm8k")().examples(resolve_data_dir("builtin"), "test"))
    assert list(scores.scores["gsm8k.answer_nll"]) == [
        f"gsm8k/example/{i}" for i in sample_indices(total, 3, "random", 1)] != [
        f"gsm8k/example/{i}" for i in range(3)]
    # a different answer_loss limit changes only the answer_loss stage
    def keys(text):
        cell = expand(load_matrix(write(workspace / "k.yaml", text)))[0]
        plan = plan_cell(cell, source_of(cell))
        return {role: stage.key for role, stage in plan.roles()}
    tasks = MATRIX.replace("tasks: []", "tasks: [boolq]")
    before, after = keys(tasks), keys(tasks.replace("limit: 3", "limit: 5"))
    assert before["answer_loss"] != after["answer_loss"]
    assert before["tasks"] == after["tasks"] and before["prune"] == after["prune"]


def test_answer_loss_on_plain_text_is_refused(workspace):
    path = write(workspace / "m.yaml", MATRIX.replace("data: [gsm8k, squad]", "data: [wikitext2]"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "answer_loss scores the answers of task data" in result.output
    assert "evaluate.answer_loss.data" in result.output
