"""The fine-tuning loop shared by the recovery methods.

AdamW with warmup and a schedule, gradient accumulation, gradient clipping, fp32 or bf16 autocast,
a held-out loss at the end (and every `eval_every` steps if asked), and a divergence guard: a NaN
or inf loss stops the stage before anything is saved. Methods plug in through two hooks
(`before_step`: the step's gradients are accumulated, not yet clipped; `after_step`); dense
recovery uses them to keep pruned weights at zero.
"""
from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from transformers import get_scheduler

from sparselab import progress
from sparselab.memory import PeakMemory
from sparselab.matrix import Train
from sparselab.plots import plot_series
from sparselab.recover.base import RecoverContext
from sparselab.recover.prompts import Example, TrainingSet, build_training_set, collate


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


def autocast(precision: str):
    if precision == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return nullcontext()


class ScoredLoss:
    """Mean next-token loss over the scored tokens (labels other than -100), as the model's own
    loss computes it. Where a batch leaves positions unscored (task examples: only the answer is
    scored), only the scored positions go through the LM head and the softmax — transformers'
    `logits_to_keep` with a boolean mask — which saves most of their cost on a large vocabulary.
    Packed text, where every position is scored, takes the usual path."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.selective = "logits_to_keep" in inspect.signature(base.forward).parameters

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        if self.selective and not scored.all():
            keep = torch.nn.functional.pad(scored, (0, 1), value=False)  # the last predicts nothing
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False, logits_to_keep=keep).logits
            if logits.dim() == 2 and logits.shape[0] == int(scored.sum()):
                return torch.nn.functional.cross_entropy(logits.float(), targets[scored])
            self.selective = False  # a transformers without boolean masks: the usual path
        return model(**batch, use_cache=False).loss


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int,
              precision: str) -> float:
    """Mean loss per target token: each batch's mean, weighted by its count of target tokens."""
    device = next(model.parameters()).device
    loss_of = ScoredLoss(model)
    total = count = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate(examples[start:start + batch_size], pad_id).items()}
        targets = int((batch["labels"][:, 1:] != -100).sum())
        if targets:
            with autocast(precision):
                total += loss_of(model, batch).item() * targets
            count += targets
    model.train(was_training)
    return total / max(count, 1)


def make_optimizer(cfg: Train, params: list, device) -> torch.optim.Optimizer:
    """AdamW (the fused kernel, transformers.Trainer's default too: each tensor in one pass), or
    Adafactor with a fixed learning rate, factored second moments and no first moment."""
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=None,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def train(model, tokenizer, ctx: RecoverContext,
          before_step: Callable[[], None] = lambda: None,
          after_step: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Fine-tune the trainable parameters of `model` in place; return the training metrics."""
    cfg: Train = ctx.config.train
    data = build_training_set(tokenizer, ctx.config.data, ctx.source, cfg.samples, cfg.seqlen,
                              cfg.seed)
    ctx.log.info("recover: %d training / %d held-out examples from %s", len(data.train),
                 len(data.held_out), data.splits)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    micro_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    steps = cfg.max_steps or math.ceil(micro_per_epoch * cfg.epochs / cfg.grad_accum)
    device = next(model.parameters()).device
    optimizer = make_optimizer(cfg, params, device)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=steps)
    generator = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    batches = _batches(data, cfg.batch_size, generator)
    loss_of = ScoredLoss(model)
    model.train()
    if cfg.gradient_checkpointing:  # non-reentrant: no inputs need requires_grad (LoRA)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start = time.perf_counter()
    tokens = 0
    with PeakMemory(device) as memory:
        for step in range(steps):
            losses = []
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in collate(next(batches), pad_id).items()}
                with autocast(cfg.precision):
                    loss = loss_of(model, batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"training loss became {loss.item()} at step {step}; nothing was "
                        f"saved. Try a lower recover.train.lr (now {cfg.lr:g}) or "
                        f"recover.train.precision: bf16 (now {cfg.precision}).")
                (loss / cfg.grad_accum).backward()
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
            before_step()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            after_step()
            record = {"train.loss": sum(losses) / len(losses),
                      "train.lr": scheduler.get_last_lr()[0]}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                record["train.eval_loss"] = mean_loss(model, data.held_out, cfg.batch_size,
                                                      pad_id, cfg.precision)
            ctx.step_metrics.append(record)
            progress.report(step + 1, steps, f"steps, loss {record['train.loss']:.3f}")
    elapsed = time.perf_counter() - start
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    eval_loss = mean_loss(model, data.held_out, cfg.batch_size, pad_id, cfg.precision)
    losses = [r["train.loss"] for r in ctx.step_metrics]
    if losses:
        on = ", ".join(f"{name} ({split})" for name, split in data.splits.items())
        plot_series(losses, ctx.artifacts / "loss_curve.png", "train.loss",
                    f"{ctx.config.method} recovery on {on}, {len(losses)} steps")
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    return {"train.eval_loss": eval_loss, "train.steps": float(steps),
            "train.final_loss": losses[-1] if losses else float("nan"),
            "train.tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "train.steps_per_s": steps / elapsed if elapsed > 0 else 0.0,
            "train.trainable_params": float(trainable),
            "train.trainable_share": trainable / total, "train.examples": float(len(data.train)),
            "train.peak_memory_mb": memory.peak_bytes / 2**20}


def _batches(data: TrainingSet, batch_size: int, generator: random.Random):
    """Endless shuffled micro-batches, reshuffled every epoch."""
    order = list(range(len(data.train)))
    while True:
        generator.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [data.train[i] for i in order[start:start + batch_size]]
