"""Shared fixtures: an isolated cache and tracking store per test, offline, and a tiny model."""
from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP threads
# slow them down by an order of magnitude; set before torch is imported anywhere.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh $SPARSELAB_HOME and SQLite tracking store, with the repo's matrices at hand."""
    monkeypatch.setenv("SPARSELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("SPARSELAB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sparselab.models import TinyLlama
    folder = tmp_path_factory.mktemp("tiny-llama")
    TinyLlama("tiny-llama").build(folder)
    return folder


@pytest.fixture
def tiny(tiny_model_dir):
    """A freshly loaded tiny-llama (tests may modify it)."""
    from sparselab.models import load_model
    return load_model(tiny_model_dir)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
