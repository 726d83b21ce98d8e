"""Calibration samples (windows, packing, mixtures, splits) and the layer-by-layer activation walk."""
from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from sparselab.data.catalog import resolve_data_dir
from sparselab.data.mixture import apportion
from sparselab.errors import UserError
from sparselab.matrix import Calibration
from sparselab.prune.calibration import calibration_set
from sparselab.prune.walk import capture_layer_inputs, walk_layers
from sparselab.registry import DATASETS
from sparselab.shapes import decoder_layers

torch.set_num_threads(2)
BUILTIN = resolve_data_dir("builtin")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def calib(tokenizer, data="wikitext2", samples=4, seqlen=32, seed=0, source=BUILTIN):
    return calibration_set(tokenizer, Calibration(data=data, samples=samples, seqlen=seqlen,
                                                  seed=seed), source)


def reference_wikitext2(tokenizer, samples: int, seqlen: int, seed: int) -> list[list[int]]:
    """The windows of `get_wikitext2` in the Wanda / SparseGPT code, on the hub-shaped rows."""
    rows = DATASETS.get("wikitext2")().records(BUILTIN, "validation")
    trainenc = tokenizer(" ".join(r["text"] for r in rows), return_tensors="pt")
    random.seed(seed)
    out = []
    for _ in range(samples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        out.append(trainenc.input_ids[0, i:i + seqlen].tolist())
    return out


def reference_c4(tokenizer, documents: list[str], samples: int, seqlen: int, seed: int):
    """The windows of `get_c4` in the Wanda / SparseGPT code."""
    random.seed(seed)
    out = []
    for _ in range(samples):
        while True:
            i = random.randint(0, len(documents) - 1)
            trainenc = tokenizer(documents[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        out.append(trainenc.input_ids[0, i:i + seqlen].tolist())
    return out


def find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start:start + len(needle)] == needle:
            return start
    return -1


def test_text_windows_are_seeded_slices_of_the_training_split(tokenizer):
    first = calib(tokenizer, seed=3)
    again = calib(tokenizer, seed=3)
    other = calib(tokenizer, seed=4)
    assert first.input_ids.shape == (4, 32) and first.input_ids.dtype == torch.long
    assert torch.equal(first.input_ids, again.input_ids)
    assert first.fingerprint == again.fingerprint
    assert not torch.equal(first.input_ids, other.input_ids)
    assert first.fingerprint["sha256"] != other.fingerprint["sha256"]
    # builtin WikiText-2 has no train split: validation, never the evaluated test split
    assert first.splits == {"wikitext2": "validation"}
    assert first.input_ids.tolist() == reference_wikitext2(tokenizer, samples=4, seqlen=32, seed=3)
    ids = tokenizer(DATASETS.get("wikitext2")().text(BUILTIN, "validation", " "))["input_ids"]
    fp = first.fingerprint
    assert (fp["samples"], fp["seqlen"], fp["seed"], fp["tokens"]) == (4, 32, 3, 128)
    assert fp["sources"]["wikitext2"]["tokens_available"] == len(ids)


def test_calibration_seed_defaults_to_the_cell_seed(tokenizer):
    from sparselab.matrix import CellConfig
    cell = CellConfig.model_validate({"model": "tiny-llama", "seed": 7, "prune": {
        "calibration": {"samples": 2, "seqlen": 16}}})
    made = calibration_set(tokenizer, cell.prune.calibration, BUILTIN)
    assert made.fingerprint["seed"] == 7
    assert torch.equal(made.input_ids, calib(tokenizer, samples=2, seqlen=16, seed=7).input_ids)


def test_task_samples_are_packed_examples(tokenizer):
    made = calib(tokenizer, data="gsm8k", samples=3, seqlen=200, seed=1)
    assert made.input_ids.shape == (3, 200)
    assert made.splits == {"gsm8k": "train"}
    dataset = DATASETS.get("gsm8k")()
    examples = dataset.examples(BUILTIN, "train")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(1)).tolist()
    eos = tokenizer.eos_token_id
    # each sample starts with a whole rendered example; short ones continue after an EOS
    first = tokenizer("".join(examples[order[0]]), add_special_tokens=False)["input_ids"]
    row = made.input_ids[0].tolist()
    assert row[:min(len(first), 200)] == first[:200]
    if len(first) < 200:
        assert row[len(first)] == eos
        second = tokenizer("".join(examples[order[1]]), add_special_tokens=False)["input_ids"]
        tail = row[len(first) + 1:]
        assert tail == second[:len(tail)]
    for sample in made.input_ids.tolist():
        assert len(sample) == 200
    used = made.fingerprint["sources"]["gsm8k"]["examples_used"]
    assert used > 3  # GSM8K examples are shorter than 200 tokens: every sample packs several
    assert int((made.input_ids == eos).sum()) == used - 3


def test_mixture_counts_and_components(tokenizer):
    mix = {"mix": {"wikitext2": 3, "gsm8k": 1}}
    made = calib(tokenizer, data=mix, samples=8, seqlen=32, seed=0)
    sources = made.fingerprint["sources"]
    assert (sources["gsm8k"]["samples"], sources["wikitext2"]["samples"]) == (2, 6)
    assert made.splits == {"gsm8k": "train", "wikitext2": "validation"}
    assert made.fingerprint["data"] == "gsm8k:0.25+wikitext2:0.75"
    # components in the mixture's (sorted) order, each as its own calibration would give it
    alone_gsm = calib(tokenizer, data="gsm8k", samples=2, seqlen=32)
    alone_wiki = calib(tokenizer, data="wikitext2", samples=6, seqlen=32)
    assert torch.equal(made.input_ids, torch.cat([alone_gsm.input_ids, alone_wiki.input_ids]))


def test_mixture_counts_round_and_add_up():
    assert apportion(128, {"a": 0.5, "b": 0.5}) == {"a": 64, "b": 64}
    assert apportion(10, {"a": 0.75, "b": 0.25}) == {"a": 8, "b": 2}  # 7.5 -> 8, 2.5 -> 2
    thirds = apportion(128, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert sum(thirds.values()) == 128 and sorted(thirds.values()) == [42, 43, 43]


def test_too_little_data_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="too few for windows of seqlen 100000"):
        calib(tokenizer, seqlen=100_000)
    with pytest.raises(ValueError, match="cannot supply 64 samples of 512 tokens"):
        calib(tokenizer, data="gsm8k", samples=64, seqlen=512)


def test_no_training_split_is_an_error(tokenizer):
    # builtin BoolQ only has its validation split, which is the one evaluation scores
    with pytest.raises(UserError, match="boolq"):
        calib(tokenizer, data="boolq")


def test_local_c4_and_boolq_train(tokenizer, tmp_path):
    (tmp_path / "c4").mkdir()
    docs = [{"text": f"Document {i} talks about the weather in town number {i}. " * 5}
            for i in range(20)]
    with gzip.open(tmp_path / "c4" / "c4-train.00000-of-01024.json.gz", "wt") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in docs)
    (tmp_path / "boolq").mkdir()
    rows = [{"question": f"is {i} even", "passage": f"The number {i}.", "label": i % 2 == 0}
            for i in range(30)]
    (tmp_path / "boolq" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = resolve_data_dir(str(tmp_path))
    made = calib(tokenizer, data={"mix": {"c4": 1, "boolq": 1}}, samples=4, seqlen=16,
                 source=source)
    assert made.splits == {"boolq": "train", "c4": "train"}
    assert made.input_ids.shape == (4, 16)
    # C4 alone: the documents and windows the reference loader draws, short documents skipped
    docs[3]["text"] = docs[7]["text"] = "Too short."
    with gzip.open(tmp_path / "c4" / "c4-train.00000-of-01024.json.gz", "wt") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in docs)
    c4 = calib(tokenizer, data="c4", samples=12, seqlen=40, seed=5, source=source)
    assert c4.input_ids.tolist() == reference_c4(tokenizer, [d["text"] for d in docs], 12, 40, 5)
    with pytest.raises(ValueError, match="no document longer than seqlen 4000"):
        calib(tokenizer, data="c4", samples=1, seqlen=4000, source=source)


# --- the layer walk ------------------------------------------------------------------------------

@torch.no_grad()
def test_walk_matches_an_ordinary_forward(tiny, tokenizer):
    ids = calib(tokenizer, samples=3, seqlen=24).input_ids
    layers = decoder_layers(tiny.model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: seen[i].append(
            (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        for i, layer in enumerate(layers)]
    for row in ids:
        tiny.model(input_ids=row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    captured = capture_layer_inputs(tiny.model, ids)
    assert "position_embeddings" in captured.kwargs
    assert torch.equal(captured.hidden, tiny.model.model.embed_tokens(ids))
    steps = 0
    for index, _layer, inputs in walk_layers(tiny.model, ids):
        assert torch.allclose(inputs.hidden, torch.cat(seen[index]), atol=1e-6)
        steps += 1
    assert steps == len(layers)
