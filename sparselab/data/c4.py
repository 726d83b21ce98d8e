"""C4 (English): the calibration corpus of the Wanda and SparseGPT papers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from sparselab.data.catalog import TextCorpus


class C4(TextCorpus):
    name = "c4"
    hub_id = "allenai/c4"
    hub_config = "en"
    hub_splits = {"train": "train", "validation": "validation"}
    local_files = {
        "train": ("c4/c4-train.00000-of-01024.json.gz", "c4/c4-train.00000-of-01024.json"),
        "validation": ("c4/c4-validation.00000-of-00008.json.gz",
                       "c4/c4-validation.00000-of-00008.json"),
    }
    eval_split = "validation"
    calibration_join = None  # the reference draws a document, then a window inside it
    revision = 2  # 2: calibration samples drawn as the reference draws them

    def read_local(self, path: Path) -> list[dict]:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return [{"text": json.loads(line)["text"]} for line in handle if line.strip()]
