"""The memory plan: predictions from the config alone, checked against measured peaks, and the
refusal of a stage that cannot fit before anything loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sparselab.cli import main
from sparselab.footprint import MemoryContext, Shape, matrix_memory, parse_size
from sparselab.models import model_source
from tests.conftest import REPO
from tests.test_run import SMOKE

# Two sizes between tiny-llama and SmolLM2, large enough that the process's own resident noise
# (a few MiB) is small beside them: fp32 and bf16, MHA-like and 4:1 GQA, 32k and 16k vocabularies.
SIZES = {
    "probe-a": ("float32", dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                max_position_embeddings=2048)),
    "probe-b": ("bfloat16", dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=4, num_attention_heads=16,
                                 num_key_value_heads=4, max_position_embeddings=2048)),
}
CALIBRATION = ["prune.calibration.samples=16", "prune.calibration.seqlen=256"]
SPEED = 'evaluate.speed={"prompt_lengths": [256], "batch_sizes": [4], "new_tokens": 8, ' \
    '"warmup": 0, "repeats": 1}'
TRAIN = ["recover.train.samples=16", "recover.train.max_steps=2", "recover.train.seqlen=256",
         "recover.train.batch_size=4", "recover.train.grad_accum=1"]
# bf16 training on a CPU without bf16 matrix units is slow: a quarter of the tokens
TRAIN_BF16 = [*TRAIN, "recover.train.seqlen=128", "recover.train.batch_size=2"]
PROBES = [
    ("probe-a", "load", []),
    ("probe-a", "prune", ["prune.method=sparsegpt", *CALIBRATION]),
    ("probe-a", "perplexity", ["evaluate.perplexity.max_windows=8"]),
    ("probe-a", "recover", TRAIN),
    ("probe-a", "recover", ["recover.method=dense", *TRAIN]),
    ("probe-a", "recover", ["recover.method=reconstruct", *TRAIN]),
    ("probe-a", "recover", ["recover.method=dense", "recover.train.optimizer=adafactor",
                            "recover.train.gradient_checkpointing=true", *TRAIN]),
    ("probe-a", "prune", ["prune.method=gqa_structured", "prune.sparsity=0.25", *CALIBRATION]),
    ("probe-a", "prune", ["prune.method=gqa_structured", "prune.sparsity=0.25",
                          "prune.options.importance=magnitude",
                          "prune.options.layer_importance=cosine", *CALIBRATION]),
    ("probe-a", "speed", [SPEED]),
    ("probe-a", "speed", [SPEED, "--zeros=0.5"]),  # unstructured zeros: the CSR kernel
    ("probe-b", "prune", CALIBRATION),
    ("probe-b", "perplexity", ["evaluate.perplexity.max_windows=8"]),
    ("probe-b", "recover", TRAIN_BF16),
    ("probe-b", "recover", ["recover.train.gradient_checkpointing=true", *TRAIN_BF16]),
]


def test_shapes_count_the_published_parameters():
    published = {"random-llama-2-7b": 6_738_415_616, "random-llama-3-8b": 8_030_261_248,
                 "random-llama-3-70b": 70_553_706_496, "random-llama-3.2-1b": 1_235_814_400,
                 "smollm2-135m": 134_515_008}
    for name, params in published.items():
        assert Shape.of(model_source(name).config()).params == params, name


@pytest.mark.slow
@pytest.mark.parametrize("size,stage,sets", PROBES,
                         ids=[f"{s}-{st}-{i}" for i, (s, st, sets) in enumerate(PROBES)])
def test_predicted_peak_is_within_15_percent_of_the_measured(size, stage, sets,
                                                             tmp_path_factory):
    """`python -m sparselab.probe` runs the stage's own computation in a process of its own and
    measures its resident peak above the loaded libraries (a GPU's allocated peak there)."""
    models = tmp_path_factory.getbasetemp() / "probe-models"
    dtype, shape = SIZES[size]
    args = [sys.executable, "-m", "sparselab.probe", "--model", size, "--shape", json.dumps(shape),
            "--dtype", dtype, "--stage", stage, "--models", str(models)]
    for item in sets:  # an option of the probe's own, or a cell setting
        args += [item] if item.startswith("--") else ["--set", item]
    env = {**os.environ, "SPARSELAB_DEVICE": "cpu"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["measured"] / result["predicted"]
    assert 0.85 <= ratio <= 1.15, (result["measured"] / 2**20, result["predicted"] / 2**20,
                                   result["parts"])


def test_onloading_keeps_one_layer_on_the_accelerator():
    shape = Shape.of(model_source("random-llama-3-70b").config())
    resident = MemoryContext(shape, "bfloat16")
    onloaded = MemoryContext(shape, "bfloat16", onload=True)
    assert resident.resident_weights == shape.params * 2
    assert onloaded.resident_weights == max(shape.layer_params, shape.vocab * shape.hidden) * 2
    assert onloaded.resident_weights < resident.resident_weights / 50


@pytest.mark.parametrize("onload", [False, True])
def test_every_stage_of_every_shipped_matrix_is_predicted(onload):
    """No stage kind of the shipped matrices is left out of the plan (it would show '?' and
    could not be refused)."""
    from sparselab.study import prepare_plans
    for path in sorted((REPO / "matrix").glob("*.yaml")):
        _, plans = prepare_plans(str(path), None, (), "builtin")
        unpredicted = [r.label for r in matrix_memory(plans, onload) if r.need is None]
        assert not unpredicted, (path.name, unpredicted)


def test_a_structured_pruning_that_cannot_fit_says_why(workspace):
    """GQA structured pruning of a 70B shape: the Taylor scores need the whole model on the
    device even onloaded (refused: more than one device); magnitude scores with the cosine
    importance fit onloaded."""
    base = ["plan", str(REPO / "matrix" / "gqa_structured.yaml"), "--only", "both_25",
            "--set", "model=random-llama-3-70b", "--set", "dtype=bfloat16",
            "--device-memory", "80GiB", "--onload", "--data-dir", "builtin"]
    taylor = CliRunner().invoke(main, base)
    said = " ".join(taylor.output.split())
    assert taylor.exit_code == 2 and "prune (1 stage(s)" in said
    assert "needs more than one device" in said and "Traceback" not in said
    magnitude = CliRunner().invoke(main, base + [
        "--set", "prune.options.importance=magnitude",
        "--set", "prune.options.layer_importance=cosine"])
    said = " ".join(magnitude.output.split())
    assert "prune (" not in said, said


def test_plan_prints_each_stage_s_memory(workspace):
    result = CliRunner().invoke(main, ["plan", str(SMOKE), "--device-memory", "80GiB"])
    assert result.exit_code == 0, result.output
    assert "predicted peak memory per distinct stage" in result.output
    assert "fits 80.0 GiB" in result.output


def test_a_stage_that_cannot_fit_is_refused_before_anything_loads(workspace):
    result = CliRunner().invoke(main, ["plan", str(SMOKE), "--device-memory", "1MiB"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "cannot fit --device-memory (0.00 GiB" in said
    assert "load (1 stage(s)" in said and "run with --onload" in said
    assert "prune (3 stage(s)" in said and "lower prune.calibration.samples" in said
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["run", str(SMOKE), "--device-memory", "1MiB"])
    assert result.exit_code == 2 and "Nothing was loaded or run" in result.output
    assert not (workspace / "home" / "stages").exists() or \
        not any((workspace / "home" / "stages").iterdir())


def test_onload_lets_a_70b_shape_prune_on_one_80gb_device(workspace):
    """Llama-3-70B in bf16 (131 GiB of weights): refused resident, its pruning and evaluation
    fit onloaded; LoRA recovery cannot (its weights alone exceed the device) and says so."""
    base = ["plan", str(SMOKE), "--only", "baseline", "--set", "model=random-llama-3-70b",
            "--set", "dtype=bfloat16", "--device-memory", "80GiB"]
    resident = CliRunner().invoke(main, base)
    said = " ".join(resident.output.split())
    assert resident.exit_code == 2 and "prune (1 stage(s)" in said
    onloaded = CliRunner().invoke(main, base + ["--onload"])
    said = " ".join(onloaded.output.split())
    assert onloaded.exit_code == 2
    assert "prune (" not in said and "perplexity (" not in said and "tasks (" not in said
    assert "recover (1 stage(s)" in said and "needs more than one device" in said


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * 2**30), ("24 GB", 24 * 10**9),
                                           ("512MiB", 512 * 2**20), ("141", 141 * 2**30)])
def test_memory_sizes_parse(text, expected):
    assert parse_size(text) == expected


def test_a_bad_memory_size_is_a_clear_error(workspace):
    result = CliRunner().invoke(main, ["plan", str(SMOKE), "--device-memory", "lots"])
    assert result.exit_code == 2
    assert "key '--device-memory'" in result.output and "80GiB" in result.output
