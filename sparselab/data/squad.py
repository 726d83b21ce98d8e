"""SQuAD 2.0: extractive QA with unanswerable questions, in the lm-eval `squadv2` prompt."""
from __future__ import annotations

import json
from pathlib import Path

from sparselab.data.catalog import TaskDataset, read_jsonl

UNANSWERABLE = "unanswerable"


class SquadV2(TaskDataset):
    name = "squad"
    hub_id = "rajpurkar/squad_v2"
    hub_splits = {"train": "train", "validation": "validation"}
    local_files = {
        "train": ("squad_v2/train-v2.0.json", "squad_v2/squad_v2_train_5k.jsonl"),
        "validation": ("squad_v2/dev-v2.0.json",),
    }
    eval_split = "validation"

    def read_local(self, path: Path) -> list[dict]:
        """Both the official nested JSON and the flattened jsonl give hub-shaped rows."""
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        rows = []
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    rows.append({
                        "id": qa["id"], "title": article["title"],
                        "context": paragraph["context"], "question": qa["question"],
                        "answers": {"text": [a["text"] for a in qa["answers"]],
                                    "answer_start": [a["answer_start"] for a in qa["answers"]]},
                    })
        return rows

    def prompt(self, record: dict) -> str:
        return (f"Title: {record['title']}\n\nBackground: {record['context']}\n\n"
                f"Question: {record['question']}\n\nAnswer:")

    def answer(self, record: dict) -> str:
        texts = record["answers"]["text"]
        return " " + (texts[0] if texts else UNANSWERABLE)
