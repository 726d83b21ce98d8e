"""BoolQ: yes/no questions about a passage, in the lm-eval `boolq` prompt."""
from __future__ import annotations

from pathlib import Path

from sparselab.data.catalog import TaskDataset, read_jsonl


class BoolQ(TaskDataset):
    name = "boolq"
    hub_id = "super_glue"
    hub_config = "boolq"
    hub_splits = {"train": "train", "validation": "validation"}
    local_files = {"train": ("boolq/train.jsonl",),
                   "validation": ("boolq/val.jsonl", "boolq/dev.jsonl")}
    eval_split = "validation"

    def read_local(self, path: Path) -> list[dict]:
        """SuperGLUE rows (label "true"/"false") and Google rows (answer bool) -> hub shape."""
        rows = []
        for row in read_jsonl(path):
            if "label" in row:
                label = row["label"] in (True, 1, "true", "True")
                passage = row["passage"]
            else:
                label = bool(row["answer"])
                passage = f"{row['title']} -- {row['passage']}" if row.get("title") else row["passage"]
            rows.append({"question": row["question"], "passage": passage, "label": int(label)})
        return rows

    def prompt(self, record: dict) -> str:
        return f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"

    def answer(self, record: dict) -> str:
        return " yes" if record["label"] else " no"
