"""Recovery: LoRA learns without touching the base; dense keeps every pruned weight at zero."""
from __future__ import annotations

import logging

import pytest
import torch

from sparselab.data.catalog import resolve_data_dir
from sparselab.matrix import CellConfig, config_hash
from sparselab.prune.layers import prunable_linears, sparsity_report
from sparselab.prune.patterns import mask_for_pattern
from sparselab.recover.base import RecoverContext
from sparselab.recover.prompts import IGNORE, task_example
from sparselab.recover.training import TrainingDiverged


def _ctx(tmp_path, **recover) -> RecoverContext:
    cell = CellConfig.model_validate({"model": "tiny-llama", "data_dir": "builtin",
                                      "prune": {"method": "magnitude"}, "recover": recover})
    (tmp_path / "artifacts").mkdir(exist_ok=True)
    return RecoverContext(cell.recover, resolve_data_dir("builtin"), tmp_path / "artifacts",
                          logging.getLogger("test"))


def _prune(loaded, pattern):
    with torch.no_grad():
        for linear in prunable_linears(loaded.model).values():
            mask = mask_for_pattern(linear.weight.abs(), pattern, 0.5, per_row=False)
            linear.weight.mul_(mask)


TRAIN = {"samples": 4, "seqlen": 32, "batch_size": 4, "grad_accum": 1, "max_steps": 25,
         "lr": 5e-3, "schedule": "constant"}


def test_lora_learns_and_leaves_the_base_bit_identical(tiny, tmp_path):
    from peft import PeftModel

    from sparselab.recover.lora import LoraRecovery
    _prune(tiny, "unstructured")
    tiny.model.save_pretrained(tmp_path / "base")  # as the prune stage stores it
    base = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    method = LoraRecovery()
    ctx = _ctx(tmp_path, method="lora", data="wikitext2", train=TRAIN,
               lora={"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["attention", "mlp"]})
    recovered, metrics = method.recover(tiny, ctx)
    losses = [s["train.loss"] for s in ctx.step_metrics]
    assert len(losses) == 25
    assert losses[-1] < losses[0] - 0.5  # the repeated small set is being learned
    assert all(b < a + 0.05 for a, b in zip(losses, losses[1:]))
    assert 0 < metrics["train.trainable_share"] < 0.5
    loaded_bytes = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    assert metrics["train.peak_memory_mb"] * 2**20 > loaded_bytes  # the resident set holds it
    for name, param in recovered.model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(param, base[original]), name
    # the adapter round-trips through peft's own format
    method.save(recovered, tmp_path / "out")
    ids = torch.randint(0, 1000, (1, 16))
    expected = recovered.model(input_ids=ids).logits
    base_model = type(recovered.model.get_base_model()).from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base_model, tmp_path / "out" / "adapter")
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    # the base stays half zero, the weights the model computes with do not: merging shows it
    _, stats = sparsity_report(loaded)
    assert stats["sparsity.linear"] == pytest.approx(0.5, abs=0.01)
    assert stats["sparsity.effective"] == stats["sparsity.effective_adapted"]  # every linear adapted
    merged = sparsity_report(loaded.merge_and_unload())[1]
    assert stats["sparsity.effective"] == pytest.approx(merged["sparsity.linear"], abs=1e-4)
    assert merged["sparsity.linear"] < 0.05 and "sparsity.effective" not in merged


@pytest.mark.parametrize("pattern,optimizer", [("unstructured", "adamw"), ("2:4", "adamw"),
                                               ("block:16x16", "adamw"),
                                               ("unstructured", "adafactor")])
def test_dense_keeps_pruned_weights_at_zero(tiny, tmp_path, pattern, optimizer):
    from sparselab.recover.dense import DenseRecovery
    _prune(tiny, pattern)
    zeros = {n: (l.weight == 0).clone() for n, l in prunable_linears(tiny.model).items()}
    before = {n: l.weight.detach().clone() for n, l in prunable_linears(tiny.model).items()}
    ctx = _ctx(tmp_path, method="dense", data="wikitext2",
               train={**TRAIN, "max_steps": 5, "weight_decay": 0.1, "lr": 1e-3,
                      "batch_size": 2, "grad_accum": 2,  # masked once per accumulated step
                      "optimizer": optimizer})
    recovered, metrics = DenseRecovery().recover(tiny, ctx)
    assert metrics["recover.sparsity_preserved"] == 1.0
    changed = 0
    for name, linear in prunable_linears(recovered.model).items():
        assert torch.all(linear.weight[zeros[name]] == 0.0), name
        assert torch.equal(linear.weight == 0, zeros[name]), name  # same sparsity, exactly
        changed += not torch.equal(linear.weight, before[name])
    assert changed == len(zeros)  # the remaining weights did train


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, tmp_path):
    """Recomputing the activations in the backward changes the memory, not the training: the
    same losses step by step and the same adapter weights (dropout's random state is replayed)."""
    from sparselab.models import load_model
    from sparselab.recover.lora import LoraRecovery

    def trained(checkpointing: bool):
        folder = tmp_path / str(checkpointing)
        folder.mkdir()
        ctx = _ctx(folder, method="lora", data="wikitext2",
                   train={**TRAIN, "max_steps": 3, "gradient_checkpointing": checkpointing})
        recovered, _ = LoraRecovery().recover(load_model(tiny_model_dir), ctx)
        adapter = {k: v.clone() for k, v in recovered.model.state_dict().items() if "lora" in k}
        return [r["train.loss"] for r in ctx.step_metrics], adapter, recovered.model

    plain_losses, plain, _ = trained(False)
    losses, adapter, model = trained(True)
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    assert adapter.keys() == plain.keys() and adapter
    for name, value in adapter.items():
        assert torch.allclose(value, plain[name], rtol=1e-5, atol=1e-7), name
    assert not model.base_model.model.is_gradient_checkpointing  # switched off after training


def test_added_training_settings_keep_earlier_identities():
    """`gradient_checkpointing` and `optimizer` came after results were recorded: at their
    defaults they leave cell hashes and stage keys as they were; set, they change them."""
    plain = CellConfig.model_validate({"model": "tiny-llama"})
    assert "gradient_checkpointing" not in plain.identity()["recover"]["train"]
    assert "optimizer" not in plain.identity()["recover"]["train"]
    lean = CellConfig.model_validate({"model": "tiny-llama", "recover": {
        "train": {"gradient_checkpointing": True, "optimizer": "adafactor"}}})
    assert lean.identity()["recover"]["train"]["optimizer"] == "adafactor"
    assert config_hash(lean.identity()) != config_hash(plain.identity())


def test_reconstruct_refuses_the_whole_model_training_settings(tmp_path):
    from sparselab.recover.reconstruct import ReconstructRecovery
    config = _ctx(tmp_path, method="reconstruct", train={"optimizer": "adafactor"}).config
    with pytest.raises(ValueError, match="apply to lora and dense"):
        ReconstructRecovery().check(config)


def test_held_out_loss_is_the_mean_over_answer_tokens(tiny):
    from sparselab.recover.training import mean_loss
    tok = tiny.tokenizer
    examples = [task_example(tok, "Question: what is two and two?\nAnswer:", " 4", seqlen=64),
                task_example(tok, "A much longer question about many things?\nAnswer:",
                             " the longer answer here", seqlen=64),
                task_example(tok, "Short?\nAnswer:", " no", seqlen=64)]
    total = count = 0.0
    for example in examples:  # one at a time, no padding: the plain definition
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor(example.labels[1:])
        logits = tiny.model(input_ids=ids).logits[0, :-1]
        keep = labels != IGNORE
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep],
                                                   reduction="sum").item()
        count += int(keep.sum())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # batches of 2 and 1: padding, and batch means weighted by their answer tokens
    assert mean_loss(tiny.model, examples, 2, pad, "fp32") == pytest.approx(total / count,
                                                                           rel=1e-5)


def test_answer_only_loss_through_the_scored_positions_alone(tiny):
    from sparselab.recover.prompts import collate
    from sparselab.recover.training import ScoredLoss
    tok = tiny.tokenizer
    batch = collate([task_example(tok, "Question: what is two and two?\nAnswer:", " 4", 64),
                     task_example(tok, "Why?\nAnswer:", " because it is", 64)], tok.eos_token_id)

    def loss_and_grads(loss_fn):
        tiny.model.zero_grad()
        loss = loss_fn(tiny.model, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in tiny.model.parameters()]

    scored = ScoredLoss(tiny.model)
    assert scored.selective
    expected, grads = loss_and_grads(lambda model, b: model(**b).loss)
    loss, selective_grads = loss_and_grads(scored)
    assert scored.selective and loss == pytest.approx(expected, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, selective_grads))
    # a model that ignores the boolean mask (an older transformers): the usual path, same loss
    forward = tiny.model.forward
    tiny.model.forward = lambda logits_to_keep=0, **kwargs: forward(**kwargs)
    try:
        fallback = ScoredLoss(tiny.model)
        assert fallback(tiny.model, batch).item() == pytest.approx(expected, rel=1e-5)
        assert not fallback.selective
    finally:
        del tiny.model.forward
    tiny.model.zero_grad()


def test_answer_only_loss_masking(tiny):
    tok = tiny.tokenizer
    example = task_example(tok, "Question: what is two and two?\nAnswer:", " 4", seqlen=64)
    answer = tok(" 4", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert example.input_ids[0] == tok.bos_token_id
    assert example.input_ids[-len(answer):] == answer
    assert example.labels[-len(answer):] == answer
    assert all(label == IGNORE for label in example.labels[:-len(answer)])
    # a long prompt is cut from the left; the answer always survives
    long = task_example(tok, "word " * 200, " 4", seqlen=16)
    assert len(long.input_ids) == 16 and long.labels[-len(answer):] == answer


def test_nan_loss_stops_training_clearly(tiny, tmp_path):
    from sparselab.recover.lora import LoraRecovery
    with torch.no_grad():
        tiny.model.model.norm.weight[0] = float("nan")
    ctx = _ctx(tmp_path, method="lora", data="wikitext2", train=TRAIN)
    with pytest.raises(TrainingDiverged, match="lower recover.train.lr"):
        LoraRecovery().recover(tiny, ctx)


def test_reconstruct_lowers_every_parts_error_and_keeps_the_masks(tiny_model_dir, tmp_path):
    from sparselab.models import load_model
    from sparselab.recover.reconstruct import ReconstructRecovery
    pruned, dense = load_model(tiny_model_dir), load_model(tiny_model_dir)
    _prune(pruned, "block:16x16")
    zeros = {n: (l.weight == 0).clone() for n, l in prunable_linears(pruned.model).items()}
    from sparselab.matrix import Calibration
    from sparselab.prune.calibration import calibration_set
    held_out = Calibration(data="wikitext2", samples=4, seqlen=32, seed=7)  # other windows
    ids = calibration_set(dense.tokenizer, held_out, resolve_data_dir("builtin")).input_ids
    with torch.no_grad():
        want = dense.model(input_ids=ids).logits
        error_before = float(((pruned.model(input_ids=ids).logits - want) ** 2).mean())
    ctx = _ctx(tmp_path, method="reconstruct", data="wikitext2",
               train={"samples": 8, "seqlen": 32, "batch_size": 4, "epochs": 10, "lr": 1e-3,
                      "schedule": "constant"})
    ctx.dense = lambda: dense
    recovered, metrics = ReconstructRecovery().recover(pruned, ctx)
    rows = (tmp_path / "artifacts" / "reconstruction.csv").read_text().splitlines()[1:]
    layers = len(rows) // 2
    assert len(rows) == 2 * layers and layers > 1
    for row in rows:
        _, part, before, after = row.split(",")
        assert float(after) < 0.9 * float(before), row
    assert metrics["recover.reconstruct.mse_after"] < metrics["recover.reconstruct.mse_before"]
    assert metrics["train.steps"] == 2 * layers * 10 * 2  # parts x epochs x batches per epoch
    for name, linear in prunable_linears(recovered.model).items():
        assert torch.equal(linear.weight == 0, zeros[name]), name  # the same zeros, exactly
    with torch.no_grad():  # on text it was not fitted on, the whole model moved towards dense
        error_after = float(((recovered.model(input_ids=ids).logits - want) ** 2).mean())
    assert error_after < error_before, (error_after, error_before)


def test_reconstruct_of_a_bf16_model_fits_in_float32_and_comes_back_bf16(tiny_model_dir,
                                                                          tmp_path):
    """A bf16 model's parts train in float32 and return to bf16: every part's error falls, the
    dtype is the model's again and the zeros are exactly the pruned ones."""
    from sparselab.models import load_model
    from sparselab.recover.reconstruct import ReconstructRecovery
    pruned = load_model(tiny_model_dir, dtype="bfloat16")
    dense = load_model(tiny_model_dir, dtype="bfloat16")
    _prune(pruned, "block:16x16")
    zeros = {n: (l.weight == 0).clone() for n, l in prunable_linears(pruned.model).items()}
    ctx = _ctx(tmp_path, method="reconstruct", data="wikitext2",
               train={"samples": 8, "seqlen": 32, "batch_size": 4, "epochs": 10, "lr": 1e-3,
                      "schedule": "constant"})
    ctx.dense = lambda: dense
    recovered, metrics = ReconstructRecovery().recover(pruned, ctx)
    for row in (tmp_path / "artifacts" / "reconstruction.csv").read_text().splitlines()[1:]:
        _, part, before, after = row.split(",")
        assert float(after) < 0.9 * float(before), row
    assert {p.dtype for p in recovered.model.parameters()} == {torch.bfloat16}
    for name, linear in prunable_linears(recovered.model).items():
        assert torch.equal(linear.weight == 0, zeros[name]), name


@pytest.mark.slow
def test_reconstruct_in_a_matrix_reads_the_dense_model_of_its_cell(workspace):
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from conftest import write
    from sparselab.cli import main
    matrix = write(workspace / "m.yaml", """
name: reconstruct
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: sparsegpt, sparsity: 0.5, pattern: "block:16x16",
          calibration: {samples: 4, seqlen: 32},
          options: {blocksize: 32, blocks: {group: column}}}
  recover: {method: reconstruct, data: wikitext2,
            train: {samples: 4, seqlen: 32, batch_size: 2, epochs: 2, lr: 1.0e-3}}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64, max_windows: 2}, tasks: []}
experiments:
  blocks: {}
""")
    result = CliRunner().invoke(main, ["run", str(matrix)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("reconstruct").experiment_id])
    metrics = next(r for r in runs if r.data.tags.get("sparselab.cell") == "blocks").data.metrics
    assert metrics["recover.reconstruct.mse_after"] < metrics["recover.reconstruct.mse_before"]
    assert metrics["sparsity.linear"] == pytest.approx(0.5)
    assert metrics["sparsity.emptied_inputs"] == 0.0  # column groups empty no input
