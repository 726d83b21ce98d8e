"""Token-level perplexity in non-overlapping windows of an explicit seqlen.

The convention of the Wanda and SparseGPT papers: join the test split with "\\n\\n", tokenize once
as the tokenizer does by default (a Llama tokenizer's BOS opens the first window, as in their
`eval_ppl`), cut into `seqlen` windows (the ragged tail is dropped), average the next-token loss over
every predicted token, exponentiate. The loss is taken in float64 from the model's logits: an fp32
cross-entropy over a 49k vocabulary is biased low by ~1e-4 per window, always the same way. The
standard error comes from the spread of the windows' mean losses (se of the mean loss, times ppl:
the delta method), so a report can tell a change from noise.
"""
from __future__ import annotations

import math

import torch

from sparselab import progress


def windows_of(tokenizer, text: str, seqlen: int, max_windows: int | None = None
               ) -> torch.Tensor:
    """The text's tokens cut into (windows, seqlen), the ragged tail dropped."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of seqlen {seqlen}")
    return ids[: windows * seqlen].view(windows, seqlen)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihoods (float64) of `targets` (batch x positions) under
    `logits` (batch x positions x vocab), one row's float64 copy at a time; targets < 0 (ignored
    positions) get 0."""
    out = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
    for row, (scores, wanted) in enumerate(zip(logits, targets)):
        log_probs = torch.log_softmax(scores.double(), dim=-1)
        out[row] = -log_probs.gather(1, wanted.clamp(min=0)[:, None])[:, 0] * (wanted >= 0)
        del log_probs  # or the next row's copy is made beside it: 3, not 2, at the peak
    return out


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """The mean next-token loss of each window, in order (the per-example scores of perplexity)."""
    from sparselab.onload import execution_device
    device = execution_device(model)
    window_nll = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        window_nll += token_nll(logits[:, :-1], batch[:, 1:]).mean(dim=1).tolist()
        progress.report(len(window_nll), len(windows), "windows")
    return window_nll


def summarise(window_nll: list[float], seqlen: int) -> dict[str, float]:
    """Perplexity, its standard error (delta method over the windows), tokens and windows."""
    windows = len(window_nll)
    nll = torch.tensor(window_nll, dtype=torch.float64)
    ppl = math.exp(nll.mean().item())
    result = {"ppl": ppl, "tokens": float(windows * (seqlen - 1)), "windows": float(windows)}
    if windows > 1:
        result["ppl_stderr"] = ppl * nll.std().item() / math.sqrt(windows)
    return result


def perplexity(model, tokenizer, text: str, seqlen: int, batch_size: int = 4,
               max_windows: int | None = None) -> dict[str, float]:
    windows = windows_of(tokenizer, text, seqlen, max_windows)
    return summarise(window_losses(model, windows, batch_size), seqlen)
