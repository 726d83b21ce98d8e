"""WikiText-2 (raw): the perplexity benchmark of the Wanda and SparseGPT papers."""
from __future__ import annotations

from pathlib import Path

from sparselab.data.catalog import TextCorpus


class WikiText2(TextCorpus):
    name = "wikitext2"
    hub_id = "wikitext"
    hub_config = "wikitext-2-raw-v1"
    hub_splits = {"train": "train", "validation": "validation", "test": "test"}
    local_files = {
        "train": ("wikitext-2/wiki.train.raw", "wikitext-2/wiki.train.tokens"),
        "validation": ("wikitext-2/wiki.valid.raw", "wikitext-2/wiki.valid.tokens"),
        "test": ("wikitext-2/wiki.test.raw", "wikitext-2/wiki.test.tokens"),
    }
    eval_split = "test"

    def read_local(self, path: Path) -> list[dict]:
        """One record per line, like the hub's rows (blank lines are ' ' or '')."""
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines()]
