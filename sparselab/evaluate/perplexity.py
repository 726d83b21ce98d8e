"""Token-level perplexity in non-overlapping windows of an explicit seqlen.

The convention of the Wanda and SparseGPT papers: join the test split with "\\n\\n", tokenize once,
cut into `seqlen` windows (the ragged tail is dropped), average the next-token loss over every
predicted token, exponentiate.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int, batch_size: int = 4,
               max_windows: int | None = None) -> dict[str, float]:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of seqlen {seqlen}")
    ids = ids[: windows * seqlen].view(windows, seqlen)
    device = next(model.parameters()).device
    nll_sum = 0.0
    for start in range(0, windows, batch_size):
        batch = ids[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += loss.item()
    tokens = windows * (seqlen - 1)
    return {"ppl": math.exp(nll_sum / tokens), "tokens": float(tokens),
            "windows": float(windows)}
