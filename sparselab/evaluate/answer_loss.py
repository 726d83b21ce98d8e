"""Answer loss: the mean next-token loss on the gold answers of a task's evaluation split.

A graded score where a small model's accuracy sits at zero (GSM8K on SmolLM2-135M): exact match
cannot tell two pruned models apart, the likelihood they give the worked solution can. Each example
is rendered 0-shot exactly as recovery fine-tunes on it (the harness's prompt, answer + eos; see
`recover.prompts.task_example`), scored on the answer tokens only; the score is the mean over
examples of each example's mean loss per answer token, with its standard error, so the report's
noise rule applies. Lower is better.

The closing eos is part of the answer (fine-tuning teaches the model to stop), so the score also
rewards a model that has learned to stop after a short answer: for BoolQ (" yes" + eos) that eos
is half the tokens. `answer_text_nll` (the answer without its eos) and `answer_eos_nll` (the eos
alone) separate knowing the answer from knowing the format.
"""
from __future__ import annotations

import math

import torch

from sparselab import progress
from sparselab.evaluate.perplexity import token_nll
from sparselab.recover.prompts import IGNORE, collate, task_example


SCORES = ("answer", "answer_text", "answer_eos")


@torch.no_grad()
def example_losses(model, tokenizer, examples: list[tuple[str, str]], seqlen: int,
                   batch_size: int = 8) -> tuple[dict[str, dict[int, float]], int]:
    """Each example's mean loss per token of the answer, of its text and of its closing eos,
    keyed by the example's index in `examples` (an example without such tokens has no entry);
    and the number of answer tokens scored."""
    if not examples:
        raise ValueError("no evaluation examples to score")
    rendered = [task_example(tokenizer, prompt, answer, seqlen) for prompt, answer in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    from sparselab.onload import execution_device
    device = execution_device(model)
    losses: dict[str, dict[int, float]] = {name: {} for name in SCORES}
    tokens = 0
    for start in range(0, len(rendered), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate(rendered[start:start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = token_nll(logits, labels)  # float64, as perplexity: IGNORE (-100) positions get 0
        scored = labels != IGNORE
        positions = torch.arange(labels.shape[1], device=labels.device)
        last = (scored * positions).argmax(dim=1, keepdim=True)  # the closing eos, if kept
        eos = (positions == last) & (labels == tokenizer.eos_token_id) & scored
        text = scored & ~eos
        for name, mask in zip(SCORES, (scored, text, eos)):
            counts = mask.sum(dim=1)
            means = (loss * mask).sum(dim=1) / counts.clamp(min=1)
            losses[name].update((start + i, m) for i, (m, c)
                                in enumerate(zip(means.tolist(), counts.tolist())) if c > 0)
        tokens += int(scored.sum())
        progress.report(min(start + batch_size, len(rendered)), len(rendered), "examples")
    return losses, tokens


def summarise(losses: dict[str, dict[int, float]], tokens: int) -> dict[str, float]:
    """Mean and standard error of each score over examples, examples and answer tokens."""
    result = {"answer_examples": float(len(losses["answer"])), "answer_tokens": float(tokens)}
    for name, values in losses.items():
        if values:
            result.update(_mean_and_stderr(name + "_nll", list(values.values())))
    return result


def answer_loss(model, tokenizer, examples: list[tuple[str, str]], seqlen: int,
                batch_size: int = 8) -> dict[str, float]:
    """`examples` are (prompt, answer) pairs; returns mean, stderr, examples and answer tokens."""
    return summarise(*example_losses(model, tokenizer, examples, seqlen, batch_size))


def _mean_and_stderr(name: str, values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    stderr = (math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)
              if n > 1 else float("nan"))
    return {name: mean, name + "_stderr": stderr}
