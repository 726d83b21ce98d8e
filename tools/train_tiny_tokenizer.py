"""Train the tiny byte-level BPE tokenizer used by sparselab's tests.

Why: tests need a real Hugging Face tokenizer that loads offline, is small enough
to keep in the repository, and encodes any text (WikiText, SQuAD, GSM8K, BoolQ, ...)
without unknown tokens. It is trained only on the original fixture data in
``sparselab/data/fixtures`` (every string field of every data file), so it carries
no third-party data.

Result: ``sparselab/assets/tiny_tokenizer/`` (``tokenizer.json`` and
``tokenizer_config.json``): byte-level BPE, vocabulary 1024, special tokens
``<unk>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos), ``<pad>``=3; single sequences get
``<s>`` prepended (like Llama); ByteLevel decoder, so decoding round-trips.

Rerun (deterministic; the output files are identical on every run)::

    python tools/train_tiny_tokenizer.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "sparselab" / "data" / "fixtures"
OUT_DIR = ROOT / "sparselab" / "assets" / "tiny_tokenizer"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
KEEP_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def _strings(obj):
    """Yield every string inside a JSON value (keys excluded)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def iter_fixture_texts(root: Path = FIXTURES):
    """Yield all text of the fixture data files, in a fixed (sorted) order."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md")
    if not files:
        raise SystemExit(f"no fixture files found under {root}")
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            yield from _strings(json.loads(text))
        elif path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
        else:  # WikiText .raw / .tokens: one paragraph per line
            yield from (line for line in text.splitlines() if line.strip())


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(iter_fixture_texts(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s>:1 $B:1",
        special_tokens=[("<s>", bos)],
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def main() -> int:
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,  # keep " ." etc. so decode(encode(x)) == x
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.iterdir():
        if old.is_file():
            old.unlink()
    hf_tok.save_pretrained(str(OUT_DIR))
    for extra in OUT_DIR.iterdir():  # drop anything the tests do not need
        if extra.name not in KEEP_FILES:
            extra.unlink()
    # Name the class the way every supported transformers version (>=4.46) knows it;
    # transformers 5 writes its internal "TokenizersBackend" name, which 4.x cannot load.
    cfg_path = OUT_DIR / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"saved {tok.get_vocab_size()}-token tokenizer to {OUT_DIR}: "
          f"{sorted(p.name for p in OUT_DIR.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
