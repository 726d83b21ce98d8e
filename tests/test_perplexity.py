"""Perplexity against a plain window-by-window computation, and its standard error."""
from __future__ import annotations

import math

import pytest
import torch

from sparselab.data.catalog import resolve_data_dir
from sparselab.evaluate.perplexity import perplexity
from sparselab.registry import DATASETS


def test_perplexity_and_its_standard_error(tiny):
    text = DATASETS.get("wikitext2")().text(resolve_data_dir("builtin"), "test")
    result = perplexity(tiny.model, tiny.tokenizer, text, seqlen=32, batch_size=3, max_windows=7)
    ids = tiny.tokenizer(text).input_ids  # with the tokenizer's own special tokens, as Wanda's
    losses = []
    with torch.no_grad():
        for w in range(7):  # one window at a time, in float64: the definition
            window = torch.tensor([ids[w * 32:(w + 1) * 32]])
            logits = tiny.model(input_ids=window).logits[0, :-1].double()
            losses.append(torch.nn.functional.cross_entropy(logits, window[0, 1:]).item())
    mean = sum(losses) / 7
    spread = math.sqrt(sum((x - mean) ** 2 for x in losses) / 6)
    assert result["windows"] == 7 and result["tokens"] == 7 * 31
    assert result["ppl"] == pytest.approx(math.exp(mean), rel=1e-9)  # batching changes ~nothing
    assert result["ppl_stderr"] == pytest.approx(math.exp(mean) * spread / math.sqrt(7), rel=1e-4)
    one = perplexity(tiny.model, tiny.tokenizer, text, seqlen=32, max_windows=1)
    assert "ppl_stderr" not in one  # no spread to measure


def test_window_losses_report_their_progress(tiny):
    import torch

    from sparselab import progress
    from sparselab.evaluate.perplexity import window_losses
    seen = []
    windows = torch.randint(0, 100, (5, 16))
    with progress.listening(lambda done, total, unit: seen.append((done, total, unit))):
        window_losses(tiny.model, windows, batch_size=2)
    assert seen == [(2, 5, "windows"), (4, 5, "windows"), (5, 5, "windows")]
    window_losses(tiny.model, windows, batch_size=2)  # nobody listening: nothing to report to
    assert len(seen) == 3
