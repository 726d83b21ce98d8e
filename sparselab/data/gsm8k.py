"""GSM8K: grade-school maths word problems with worked solutions ending '#### N'."""
from __future__ import annotations

from sparselab.data.catalog import TaskDataset


class GSM8K(TaskDataset):
    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    hub_splits = {"train": "train", "test": "test"}
    local_files = {"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)}
    eval_split = "test"

    def prompt(self, record: dict) -> str:
        return f"Question: {record['question']}\nAnswer:"

    def answer(self, record: dict) -> str:
        return " " + record["answer"]
