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
    revision = 2  # 2: local rows as the hub builds them; calibration as the reference samples it

    def read_local(self, path: Path) -> list[dict]:
        """The rows the hub's `wikitext` builder makes of the same file: every line keeps its
        "\\n", a blank line (" \\n" in the raw files) is "". Read the way the builder reads it
        (text mode, lines split at newlines only), so the texts agree token for token."""
        with path.open(encoding="utf-8") as handle:
            return [{"text": row if row.strip() else ""} for row in handle]
