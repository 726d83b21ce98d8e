"""The matrix file: pydantic models, expansion into cells, and the hashing that gives cells identity.

A cell = top-level settings + `defaults` + one experiment's dotted overrides + one grid point
(+ `--set` overrides from the command line), validated into a `CellConfig`. Its identity is the
hash of the fully resolved config, so equal configs share runs and cache entries.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, NonNegativeInt, PositiveFloat,
                      PositiveInt, PrivateAttr, Tag, ValidationError, field_validator,
                      model_validator)

from sparselab.errors import UserError, did_you_mean
from sparselab.registry import DATASETS, PRUNING, RECOVERY, TASKS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)
    # Fields added after results were recorded, with the default that does what the code did
    # before them: `identity()` leaves them out while they hold it, so every earlier cell hash and
    # stage key stays valid (the cache and the finished runs are found again).
    added_defaults: ClassVar[dict[str, Any]] = {}

    def identity(self) -> dict[str, Any]:
        """What hashes and stage keys are made of: the JSON dump, minus added fields that hold
        their defaults (in nested sections too)."""
        dump = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in self.added_defaults and value == self.added_defaults[name]:
                dump.pop(name)
            elif isinstance(value, Strict):
                dump[name] = value.identity()
        return dump


# torch, numpy and Python's random all take seeds in [0, 2**32 - 1]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _check_dataset(name: str) -> str:
    DATASETS.check(name)
    return name


DatasetName = Annotated[str, Field(description="a dataset of the catalog")]


class Mixture(Strict):
    """`{mix: {wikitext2: 0.5, squad: 0.5}}`: sources interleaved by weight (normalised to 1)."""
    mix: dict[str, PositiveFloat]

    @field_validator("mix")
    @classmethod
    def _names_and_weights(cls, mix: dict[str, float]) -> dict[str, float]:
        if len(mix) < 1:
            raise ValueError("a mixture needs at least one dataset")
        for name in mix:
            _check_dataset(name)
        total = sum(mix.values())
        return {name: weight / total for name, weight in sorted(mix.items())}


# A name or a mixture, told apart by shape so an error speaks of the one that was meant
DataRef = Annotated[Union[Annotated[str, Tag("<name>")], Annotated[Mixture, Tag("<mixture>")]],
                    Discriminator(lambda v: "<name>" if isinstance(v, str) else "<mixture>")]


def _check_data_ref(value: DataRef) -> DataRef:
    if isinstance(value, str):
        _check_dataset(value)
    return value


def data_components(ref: DataRef) -> dict[str, float]:
    """The datasets of a data reference with their weights."""
    return {ref: 1.0} if isinstance(ref, str) else dict(ref.mix)


def describe_data(ref: DataRef) -> str:
    if isinstance(ref, str):
        return ref
    return "+".join(f"{name}:{weight:g}" for name, weight in ref.mix.items())


_PATTERN = re.compile(r"^(unstructured|tiers|(\d+):(\d+)|block:(\d+)x(\d+))$")


PATTERNS = {  # what `prune.pattern` takes (sparselab.prune.patterns implements them)
    "unstructured": "any weights, per output row (Wanda) or across the layer",
    "N:M": "keep N of every M consecutive input weights, e.g. 2:4 (sparse tensor cores)",
    "block:RxC": "whole R x C blocks removed, e.g. block:16x16",
    "tiers": "three-tier hybrid of 16x16 blocks: dense / N:M / removed (options.tiers)",
}


def parse_pattern(pattern: str) -> tuple[str, tuple[int, ...]]:
    """'2:4' -> ('nm', (2, 4)); 'block:16x16' -> ('block', (16, 16)); plain names -> (name, ())."""
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError(f"unknown pattern '{pattern}'. Valid: unstructured, N:M (e.g. 2:4), "
                         "block:BxB (e.g. block:16x16), tiers")
    if match.group(2):
        n, m = int(match.group(2)), int(match.group(3))
        if not 0 < n < m:
            raise ValueError(f"N:M pattern '{pattern}' needs 0 < N < M")
        return "nm", (n, m)
    if match.group(4):
        rows, cols = int(match.group(4)), int(match.group(5))
        if rows < 1 or cols < 1:
            raise ValueError(f"block pattern '{pattern}' needs positive sizes")
        return "block", (rows, cols)
    return pattern, ()


def _try_parse_pattern(pattern: str) -> tuple[str, tuple[int, ...]]:
    try:
        return parse_pattern(pattern)
    except ValueError:  # the pattern's own validator says what is wrong
        return "", ()


def errors_at(prefix: tuple[str, ...], exc: ValidationError) -> list[dict[str, Any]]:
    """A nested model's validation errors, placed at `prefix` inside the model validating it."""
    return [{"type": e["type"], "loc": (*prefix, *e["loc"]), "input": e["input"],
             **({"ctx": e["ctx"]} if "ctx" in e else {})} for e in exc.errors()]


class Calibration(Strict):
    data: DataRef = "wikitext2"
    samples: PositiveInt = 128
    seqlen: PositiveInt = 512
    seed: Seed | None = None  # None: the cell's seed

    _data = field_validator("data")(classmethod(lambda cls, v: _check_data_ref(v)))


class Prune(Strict):
    method: str = "wanda"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: str = "unstructured"
    calibration: Calibration = Calibration()
    layer_ratios: Literal["uniform", "owl"] | list[float] = "uniform"
    skip_layers: list[NonNegativeInt] = []
    # As written (what the stage key hashes); `method_options` is the method's typed view of it
    options: dict[str, Any] = {}
    _options: BaseModel | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _typed_options(cls, data: Any, handler) -> Prune:
        """`options` validated once, as the file is read, by the method's own options model
        (`sparselab/prune/<method>/config.py`), so an error names its key and line."""
        prune = handler(data)
        if prune.options:
            try:
                prune._options = PRUNING.options(prune.method).model_validate(prune.options)
            except ValidationError as exc:
                raise ValidationError.from_exception_data(
                    cls.__name__, errors_at(("options",), exc)) from None
        return prune

    @property
    def method_options(self) -> BaseModel:
        """The options as the method's options model, defaults filled in."""
        if self._options is None:  # no options given: the defaults, validated when first used
            self._options = PRUNING.options(self.method).model_validate(self.options)
        return self._options

    @model_validator(mode="before")
    @classmethod
    def _pattern_sets_sparsity(cls, data: Any) -> Any:
        """Without a `sparsity`, a pattern that fixes its own (N:M: 1 - N/M; tiers: from
        options.tiers) is recorded, not the default (a contradicting one is refused by
        `PruningMethod.check`, after the method's own objections to the pattern)."""
        pattern = data.get("pattern") if isinstance(data, dict) else None
        if isinstance(pattern, str) and "sparsity" not in data:
            kind, args = _try_parse_pattern(pattern)
            if kind == "nm":
                return {**data, "sparsity": 1 - args[0] / args[1]}
            if kind == "tiers":
                from sparselab.prune.options import TierOptions
                options = data.get("options")
                tiers = options.get("tiers", {}) if isinstance(options, dict) else {}
                try:
                    return {**data, "sparsity": TierOptions.model_validate(tiers).sparsity}
                except ValidationError:  # reported where the method's options are validated
                    return data
        return data

    @field_validator("method")
    @classmethod
    def _method(cls, method: str) -> str:
        PRUNING.check(method)
        return method

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        parse_pattern(pattern)
        return pattern

    @field_validator("layer_ratios")
    @classmethod
    def _ratios(cls, ratios):
        if isinstance(ratios, list) and not all(0.0 <= r < 1.0 for r in ratios):
            raise ValueError("every per-layer ratio must lie in [0, 1)")
        return ratios


class Lora(Strict):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] = ["q_proj", "v_proj"]
    merge: bool = False


class Train(Strict):
    samples: PositiveInt = 1000
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None  # overrides epochs (the data is cycled)
    seqlen: PositiveInt = 512
    batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 4
    lr: PositiveFloat = 2.0e-4
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: NonNegativeInt = 0
    max_grad_norm: PositiveFloat = 1.0
    weight_decay: float = Field(0.0, ge=0.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: PositiveInt | None = None  # held-out loss every N steps (always at the end)
    seed: Seed | None = None  # None: the cell's seed
    # recompute each decoder layer's activations in the backward: only the layers' inputs are
    # kept (the memory plan's activations shrink ~10-20x), for ~1/3 more compute
    gradient_checkpointing: bool = False
    # adafactor: factored second moments and no first moment (Shazeer & Stern 2018), so
    # (almost) no optimizer state beside the weights: what makes dense recovery of 8B fit 80 GB
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    added_defaults: ClassVar[dict[str, Any]] = {"gradient_checkpointing": False,
                                                "optimizer": "adamw"}


class Recover(Strict):
    method: str = "lora"
    data: DataRef = "wikitext2"
    lora: Lora = Lora()
    train: Train = Train()

    _data = field_validator("data")(classmethod(lambda cls, v: _check_data_ref(v)))

    @field_validator("method")
    @classmethod
    def _method(cls, method: str) -> str:
        RECOVERY.check(method)
        return method


class Perplexity(Strict):
    data: str = "wikitext2"
    seqlen: PositiveInt = 512
    batch_size: PositiveInt = 4
    max_windows: PositiveInt | None = None  # None: the whole test split

    _data = field_validator("data")(classmethod(lambda cls, v: _check_dataset(v)))


# Which `limit` examples are scored: the first N (lm-eval's `limit`), or N drawn at random with
# the seed, in split order. SQuAD v2 dev is grouped by article, so its first N are a few articles.
Sample = Literal["first", "random"]


def sample_indices(total: int, limit: int | None, sample: str, seed: int) -> list[int]:
    """The indices of the examples a `limit` and `sample` setting score, in split order."""
    if limit is None or limit >= total:
        return list(range(total))
    if sample == "random":
        return sorted(random.Random(seed).sample(range(total), limit))
    return list(range(limit))


class AnswerLoss(Strict):
    """`evaluate.answer_loss`: mean loss on the gold answers of task datasets' evaluation splits
    (sparselab.evaluate.answer_loss), for tasks whose accuracy cannot separate the cells."""
    data: list[str] = ["squad", "gsm8k", "boolq"]
    limit: PositiveInt | None = 200  # N examples of the evaluation split; None: all
    sample: Sample = "first"  # which N: see Evaluate.sample
    seed: Seed = 0  # of sample: random
    seqlen: PositiveInt = 512
    batch_size: PositiveInt = 8

    @field_validator("data")
    @classmethod
    def _data(cls, names: list[str]) -> list[str]:
        for name in names:
            _check_dataset(name)
        return names


class TaskSettings(Strict):
    """The `tasks` stage's section of `evaluate`: which lm-eval tasks, on how many documents."""
    tasks: list[str] = ["squadv2", "gsm8k", "boolq"]
    limit: PositiveInt | None = 200
    sample: Sample = "first"  # which `limit` documents of each task (seeded by `seed`)
    num_fewshot: NonNegativeInt | None = None  # None: each task's lm-eval default
    batch_size: PositiveInt = 8
    # Overrides the tasks' generation settings (e.g. {max_gen_toks: 16} for smoke runs). It
    # changes what is measured, so it is part of the stage key and logged; empty = lm-eval's own.
    gen_kwargs: dict[str, Any] = {}
    seed: Seed | None = None  # None: the cell's seed

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            TASKS.check(task)
        return tasks


class Speed(Strict):
    """`evaluate.speed`: what the model costs at inference, on the dense kernel and on the sparse
    kernel its zeros fit (sparselab.evaluate.speed says which).

    ```yaml
    evaluate:
      speed: {prompt_lengths: [128, 512], batch_sizes: [1, 8], new_tokens: 32, threads: 2}
    ```
    """
    prompt_lengths: list[PositiveInt] = Field(default=[128, 512], min_length=1)  # prefill, batch 1
    batch_sizes: list[PositiveInt] = Field(default=[1, 8], min_length=1)  # decode throughput
    decode_prompt: PositiveInt = 64  # prompt tokens before the timed decode steps
    new_tokens: PositiveInt = 32  # decode steps timed per call
    warmup: NonNegativeInt = 2  # untimed calls first
    repeats: PositiveInt = 5  # timed calls: the median and the interquartile range are logged
    threads: PositiveInt | None = None  # torch's threads; None: every core this process may use


# Evaluation stages that came after the schema's first ones: name -> the type of the section a
# matrix sets as `evaluate.<name>` (absent or null: the stage does not run). An unset section
# is left out of a cell's config, so adding one leaves every existing cell's hash as it was.
# `speed` is built in; `sparselab.stages.register_evaluation` adds more.
ADDED_EVALUATIONS: dict[str, type[BaseModel]] = {"speed": Speed}


class Evaluate(TaskSettings):
    """`evaluate`: the evaluation stages' sections, with the `tasks` stage's settings at the top
    (as they were before the stages had sections of their own: keys stay as they were)."""
    model_config = ConfigDict(extra="allow")  # only ADDED_EVALUATIONS: see _added_sections
    perplexity: Perplexity | None = Perplexity()
    answer_loss: AnswerLoss | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _added_sections(cls, data: Any, handler):
        """Keys beyond the fields are refused as pydantic refuses extra keys, unless an added
        evaluation owns them; then they are validated as its section (errors at their key)."""
        if not isinstance(data, dict):
            return handler(data)
        extra = [key for key in data if key not in cls.model_fields]
        errors, sections = [], {}
        for key in extra:
            section = ADDED_EVALUATIONS.get(key)
            if section is None:
                errors.append({"type": "extra_forbidden", "loc": (key,), "input": data[key]})
                continue
            try:
                sections[key] = None if data[key] is None else section.model_validate(data[key])
            except ValidationError as exc:
                errors += errors_at((key,), exc)
        try:
            evaluate = handler({k: v for k, v in data.items() if k not in extra})
        except ValidationError as exc:
            errors = [*exc.errors(), *errors]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        evaluate.__pydantic_extra__.update(sections)
        return evaluate

    def added(self, name: str) -> BaseModel | None:
        """The section of an added evaluation stage, or None where the cell sets none."""
        return (self.__pydantic_extra__ or {}).get(name)


class CellConfig(Strict):
    """One fully resolved cell: everything a run needs, nothing implicit."""
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: Seed = 0
    data_dir: str | None = None
    trust_remote_code: bool = False
    prune: Prune = Prune()
    recover: Recover = Recover()
    evaluate: Evaluate = Evaluate()

    @field_validator("model")
    @classmethod
    def _model(cls, model: str) -> str:
        from sparselab.models import check_model_name
        check_model_name(model)
        return model

    @model_validator(mode="after")
    def _fill_seeds(self) -> CellConfig:
        """Stage seeds default to the cell seed; written out so the hash sees them."""
        cal, train, ev = self.prune.calibration, self.recover.train, self.evaluate
        updates = {}
        if cal.seed is None:
            updates["prune"] = self.prune.model_copy(
                update={"calibration": cal.model_copy(update={"seed": self.seed})})
        if train.seed is None:
            updates["recover"] = self.recover.model_copy(
                update={"train": train.model_copy(update={"seed": self.seed})})
        if ev.seed is None:
            updates["evaluate"] = ev.model_copy(update={"seed": self.seed})
        for key, value in updates.items():
            object.__setattr__(self, key, value)
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted params for MLflow (`prune.calibration.data`). A section whose method passes
        the model through (`none`) logs only its method: the dense reference and unrecovered
        cells used no calibration, LoRA or learning rate, and the runs table should not say
        they did."""
        tree = self.model_dump(mode="json")
        for section, registry in (("prune", PRUNING), ("recover", RECOVERY)):
            if registry.get(tree[section]["method"]).passes_through:
                tree[section] = {"method": tree[section]["method"]}
        return flatten(tree)


# The stage seeds a replicate may vary. The evaluation's sampling seed is not one of them: every
# replicate scores the same examples, so replicates are paired across cells by example too.
SeedKey = Literal["prune.calibration.seed", "recover.train.seed"]
REPLICATES = "replicates"  # the key in `defaults` or an experiment (dotted: replicates.n)


class Replicates(Strict):
    """How many draws of which stage seeds each cell runs: the randomness a verdict must
    survive (which calibration windows were drawn, LoRA's initialisation and data order).

    `seeds` names the seeds to vary, with `n` draws: replicate i sets each to the cell's own
    value + i, so replicate 0 is the unreplicated cell and replicate i uses the same seeds in
    every cell (common random numbers: replicates pair across cells). Or `seeds` maps each key
    to its list of values (replicate i takes the i-th), all lists of one length."""
    seeds: list[SeedKey] | dict[SeedKey, list[Seed]] = ["prune.calibration.seed",
                                                        "recover.train.seed"]
    n: PositiveInt | None = None

    @model_validator(mode="after")
    def _draws(self) -> Replicates:
        if isinstance(self.seeds, dict):
            lengths = {len(values) for values in self.seeds.values()}
            if len(lengths) != 1 or 0 in lengths:
                raise ValueError("replicates.seeds: give every seed the same number of values "
                                 f"(got {sorted(lengths)})")
            if self.n is not None and self.n != lengths.pop():
                raise ValueError("replicates.n disagrees with the length of the seed lists; "
                                 "leave n out when the seeds are listed")
        elif self.n is None:
            raise ValueError("replicates: give n, the number of draws (e.g. {seeds: "
                             "[prune.calibration.seed], n: 5}), or list the seed values")
        if not self.seeds:
            raise ValueError("replicates.seeds names no seed to vary (valid: "
                             "prune.calibration.seed, recover.train.seed)")
        return self

    @property
    def count(self) -> int:
        return self.n if isinstance(self.seeds, list) else len(next(iter(self.seeds.values())))

    def draw(self, index: int, cell_seeds: dict[str, int]) -> dict[str, int]:
        """The dotted seed settings of replicate `index`, given the cell's own seeds."""
        if isinstance(self.seeds, dict):
            return {key: values[index] for key, values in self.seeds.items()}
        return {key: cell_seeds[key] + index for key in self.seeds}


Direction = Literal["up", "down", "same", "better", "worse"]


class ReportSpec(Strict):
    """How `sparselab report` compares cells (see sparselab.report and sparselab.stats)."""
    baseline: str | None = None
    metrics: list[str] = ["squadv2.exact", "squadv2.f1", "gsm8k.exact_match", "boolq.acc",
                          "wikitext2.ppl"]
    alpha: float = Field(0.05, gt=0, lt=1)  # significance level of every verdict
    correction: Literal["holm", "bh", "none"] = "holm"  # over the `expect:` family
    # Equivalence margin per metric for `same`: an absolute change, or "5%" of the baseline's
    # value; metrics not listed get sparselab.report.default_margin.
    margin: dict[str, float | str] = {}
    seed: Seed = 0  # of the bootstrap and permutation resampling

    @field_validator("margin")
    @classmethod
    def _margin(cls, margins: dict[str, float | str]) -> dict[str, float | str]:
        for metric, value in margins.items():
            if isinstance(value, str) and not re.fullmatch(r"\d+(\.\d+)?%", value.strip()):
                raise ValueError(f"margin of '{metric}' is '{value}': give a number (an absolute "
                                 "change) or a percentage of the baseline such as '5%'")
        return margins


class Matrix(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: Seed = 0
    data_dir: str | None = None
    trust_remote_code: bool = False
    defaults: dict[str, Any] = {}
    experiments: dict[str, dict[str, Any]] = {}
    grid: dict[str, list[Any]] = {}
    expect: dict[str, dict[str, Direction]] = {}
    report: ReportSpec = ReportSpec()

    @field_validator("experiments")
    @classmethod
    def _experiment_names(cls, experiments: dict[str, dict[str, Any]]):
        for name in experiments:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name) or name == DENSE:
                raise ValueError(f"experiment name '{name}' must be a plain word "
                                 f"(letters, digits, _ . -) and not '{DENSE}'")
        return experiments

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]):
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key '{key}' has no values")
        return grid

    @field_validator("expect")
    @classmethod
    def _expect(cls, expect: dict[str, dict[str, str]]):
        """better/worse needs a metric with a better side (not sparsity or parameter counts)."""
        from sparselab.report import orientation
        for cell, expectations in expect.items():
            for metric, direction in expectations.items():
                if direction in ("better", "worse") and orientation(metric) == 0:
                    raise ValueError(f"'{cell}: {metric}: {direction}': {metric} has no better "
                                     "or worse side; expect up, down or same")
        return expect


DENSE = "dense"


def is_dense_reference(cell: str) -> bool:
    """`dense`, or `dense[i]` when a matrix has several models; not a cell such as `dense_ft`."""
    return cell == DENSE or re.fullmatch(rf"{DENSE}\[\d+\]", cell) is not None


class Cell(BaseModel):
    """A named, resolved cell of the matrix; replicates of one cell share its name and differ
    in `replicate` (and the seeds it drew)."""
    model_config = ConfigDict(frozen=True)
    name: str
    experiment: str | None
    config: CellConfig
    replicate: int | None = None  # None: the cell is not replicated

    @property
    def hash(self) -> str:
        identity = self.config.identity()
        return config_hash(identity if self.replicate is None
                           else {"config": identity, "replicate": self.replicate})

    @property
    def id(self) -> str:
        """Unique within a matrix: the name, and `#i` for replicate i."""
        return self.name if self.replicate is None else f"{self.name}#{self.replicate}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "mix":
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_hash(config: Any, length: int = 12) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating (or replacing scalars with) dicts on the way."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = copy.deepcopy(value)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "mix":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set prune.sparsity=0.6` -> {'prune.sparsity': 0.6}; values are parsed as YAML."""
    overrides: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{item}' is not KEY=VALUE (e.g. --set prune.sparsity=0.6).")
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--set '{item}': the value is not valid YAML ({exc}).") from None
    return overrides


# --- loading -----------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"duplicate key '{key}' (first on line {seen[key]}); every key, "
                                "experiment names included, must appear once.",
                                line=key_node.start_mark.line + 1, key=str(key))
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Line number of every mapping key, by its path of keys."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = path + (str(key_node.value),)
                index[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return index


class MatrixFile:
    """A matrix read from disk, kept with its line index so errors can point at lines."""

    def __init__(self, path: str | Path, matrix: Matrix, lines: dict[tuple[str, ...], int]):
        self.path = str(path)
        self.matrix = matrix
        self.lines = lines

    def line_of(self, *candidates: tuple[str, ...]) -> int | None:
        """The line of the first candidate key path found exactly, else of the longest
        candidate prefix of at least two keys, else of the first top-level key found."""
        for path in candidates:
            if path in self.lines:
                return self.lines[path]
        best = max(((cut, path) for path in candidates for cut in range(2, len(path))
                    if path[:cut] in self.lines), default=None)
        if best:
            return self.lines[best[1][:best[0]]]
        return next((self.lines[p[:1]] for p in candidates if p[:1] in self.lines), None)


# Bounds on what a matrix may expand to, so a mistake (or a YAML alias bomb) is refused at once
# instead of hanging validation: raised with --max-cells / --max-nodes.
MAX_CELLS = 1000
MAX_NODES = 100_000


def expanded_size(tree: Any, limit: int) -> int:
    """Nodes of a YAML tree with every alias expanded, counted up to `limit` + 1 (so a bomb
    costs `limit` steps, not its exponential size)."""
    count, stack = 0, [tree]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def load_matrix(path: str | Path, max_nodes: int = MAX_NODES) -> MatrixFile:
    path = Path(path)
    if not path.is_file():
        raise UserError("matrix file not found; give the path of a YAML matrix "
                        "(see matrix/ for the shipped ones).", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"the file is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                        f"offset {exc.start}); save the matrix as UTF-8.", file=str(path),
                        line=line) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except UserError as exc:
        exc.file = str(path)
        raise
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise UserError(f"YAML tag not allowed ({exc.problem}); a matrix holds plain data only "
                        "(mappings, lists, strings, numbers, booleans).",
                        file=str(path), line=line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"YAML syntax error: {problem}.", file=str(path),
                        line=mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise UserError("a matrix must be a YAML mapping with at least 'name' and 'model'.",
                        file=str(path))
    if expanded_size(raw, max_nodes) > max_nodes:
        raise UserError(f"the matrix expands to more than {max_nodes:,} YAML nodes once its "
                        "aliases (&name / *name) are expanded: an alias nested in aliases grows "
                        "exponentially. Write the values out, or pass --max-nodes to allow a "
                        "larger file.", file=str(path))
    lines = _line_index(text)
    try:
        matrix = Matrix.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(str(p) for p in error["loc"])
        raise UserError(_explain(error, Matrix), file=str(path), line=_first_line(lines, loc),
                        key=".".join(loc)) from None
    _check_cell_names(matrix, str(path), lines)
    return MatrixFile(path, matrix, lines)


def _check_cell_names(matrix: Matrix, path: str, lines: dict[tuple[str, ...], int]) -> None:
    """`expect:` and `report.baseline` must name an experiment (or one of its grid cells)."""
    names = list(matrix.experiments) or ["default"]
    valid = ", ".join(names)
    for cell in matrix.expect:
        if cell.split("[")[0] not in names:
            raise UserError(f"expect: '{cell}' is not an experiment of this matrix, so its "
                            f"hypotheses would never be judged.{did_you_mean(cell, names)} "
                            f"Experiments: {valid}.", file=path,
                            line=_first_line(lines, ("expect", cell)), key=f"expect.{cell}")
    baseline = matrix.report.baseline
    if baseline is not None and baseline.split("[")[0] not in names \
            and not is_dense_reference(baseline):
        raise UserError(f"report.baseline '{baseline}' is not an experiment of this matrix."
                        f"{did_you_mean(baseline, names)} Valid: {valid}, or {DENSE} (the "
                        "unpruned model).", file=path,
                        line=_first_line(lines, ("report", "baseline")), key="report.baseline")


def _first_line(lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def _fields_at(model: type[BaseModel], loc: tuple[str, ...], tree: Any = None) -> list[str]:
    """Valid keys of the model found at `loc` (for 'did you mean'). `tree`, the data being
    validated, decides the model where the data does: a method's options, an added
    evaluation's section."""
    node = tree
    for part in loc:
        if model is Prune and part == "options":
            method = node.get("method", "wanda") if isinstance(node, dict) else "wanda"
            if method not in PRUNING:
                return []
            nested = PRUNING.options(method)
        elif issubclass(model, Evaluate) and part in ADDED_EVALUATIONS:
            nested = ADDED_EVALUATIONS[part]
        else:
            field = model.model_fields.get(part)
            if field is None:
                break
            annotation = field.annotation
            candidates = [annotation, *getattr(annotation, "__args__", ())]
            found = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
            if not found:
                break
            nested = found[0]
        model, node = nested, node.get(part) if isinstance(node, dict) else None
    return [field.alias or name for name, field in model.model_fields.items()]


def _explain(error: dict[str, Any], model: type[BaseModel], tree: Any = None) -> str:
    loc = tuple(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1], tree)
        return (f"unknown key '{loc[-1]}'.{did_you_mean(loc[-1], valid)} "
                f"Valid keys here: {', '.join(valid)}.")
    if error["type"] == "missing":
        return "this key is required."
    message = error["msg"]
    message = message.removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, (str, int, float, bool)) and error["type"] != "value_error":
        return f"{message} (got {given!r})."
    return message if message.endswith(".") else message + "."


# --- expansion ---------------------------------------------------------------------------------

TOP_LEVEL = ("model", "dtype", "seed", "data_dir", "trust_remote_code")


def expand(mf: MatrixFile, overrides: dict[str, Any] | None = None,
           data_dir: str | None = None, max_cells: int = MAX_CELLS) -> list[Cell]:
    """Defaults x experiments x grid (+ --set overrides) -> validated cells, in file order."""
    m = mf.matrix
    count = max(1, len(m.experiments)) * math.prod(len(values) for values in m.grid.values())
    if count > max_cells:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in m.grid.items())
        raise UserError(f"the matrix expands to {count:,} cells ({max(1, len(m.experiments))} "
                        f"experiment(s) x {sizes or '1'}), more than the limit of {max_cells:,}; "
                        "shrink the grid, or pass --max-cells to run that many.", file=mf.path,
                        line=mf.line_of(("grid",)), key="grid")
    base = {key: getattr(m, key) for key in TOP_LEVEL}
    base = deep_merge(base, m.defaults)
    if data_dir is not None:
        base["data_dir"] = data_dir
    experiments = m.experiments or {None: {}}
    keys = list(m.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*m.grid.values())]
    cells: list[Cell] = []
    for exp_name, exp_overrides in experiments.items():
        for point in points:
            tree = copy.deepcopy(base)
            for dotted, value in {**exp_overrides, **point, **(overrides or {})}.items():
                set_dotted(tree, dotted, value)
            name = exp_name or "default"
            if point:
                name += "[" + ",".join(f"{k}={_short(v)}" for k, v in point.items()) + "]"
            replicates = _replicates(mf, tree.pop(REPLICATES, None), exp_name, name)
            config = _validate_cell(mf, tree, exp_name, name, overrides or {})
            if replicates is None:
                cells.append(Cell(name=name, experiment=exp_name, config=config))
                continue
            flat = flatten(config.model_dump(mode="json"))
            for index in range(replicates.count):
                drawn = copy.deepcopy(tree)
                for dotted, seed in replicates.draw(index, flat).items():
                    set_dotted(drawn, dotted, seed)
                cells.append(Cell(name=name, experiment=exp_name, replicate=index,
                                  config=_validate_cell(mf, drawn, exp_name, name,
                                                        overrides or {})))
    seen: dict[str, str] = {}
    for cell in cells:
        if cell.hash in seen:
            raise UserError(f"cells '{seen[cell.hash]}' and '{cell.id}' resolve to the same "
                            "config; remove one of them or make them differ.", file=mf.path)
        seen[cell.hash] = cell.id
    return cells


def _replicates(mf: MatrixFile, raw: Any, experiment: str | None,
                cell: str) -> Replicates | None:
    """The cell's `replicates:` (from defaults, its experiment, the grid or --set), validated."""
    if raw is None:
        return None
    try:
        return Replicates.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(str(p) for p in error["loc"] if not str(p).startswith(("list[", "dict[")))
        error = {**error, "loc": loc}
        line = mf.line_of(("experiments", str(experiment), REPLICATES, *loc),
                          ("experiments", str(experiment), ".".join((REPLICATES, *loc))),
                          ("defaults", REPLICATES, *loc), ("defaults", REPLICATES))
        raise UserError(f"in cell '{cell}': {_explain(error, Replicates, raw)}", file=mf.path,
                        line=line, key=".".join((REPLICATES, *loc))) from None


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)


def _validate_cell(mf: MatrixFile, tree: dict[str, Any], experiment: str | None,
                   cell: str, overrides: dict[str, Any]) -> CellConfig:
    try:
        return CellConfig.model_validate(tree)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(str(p) for p in error["loc"])
        # Pydantic reports which union branch failed ("str", "<mixture>"); drop those parts.
        loc = tuple(p for p in loc if p not in ("str", "Mixture", "list[float]") and
                    not p.startswith(("literal[", "<")))
        error = {**error, "loc": loc}
        dotted = ".".join(loc)
        flag = next((key for key in overrides if f"{dotted}.".startswith(f"{key}.")
                     or key.startswith(f"{dotted}.")), None)
        if flag is not None:  # the value came from the command line, not from the file
            raise UserError(f"--set {flag}={_short(overrides[flag])}: in cell '{cell}': "
                            f"{_explain(error, CellConfig, tree)}", file=mf.path, key=dotted) from None
        line = mf.line_of(("experiments", str(experiment), dotted), ("grid", dotted),
                          ("defaults", *loc), loc, ("experiments", str(experiment)))
        raise UserError(f"in cell '{cell}': {_explain(error, CellConfig, tree)}", file=mf.path,
                        line=line, key=dotted) from None


def dense_reference(cell: Cell) -> Cell:
    """The unpruned, unrecovered model with the same model and evaluation settings."""
    config = cell.config.model_copy(update={
        "prune": Prune(method="none", sparsity=0.0),
        "recover": Recover(method="none"),
    })
    return Cell(name=DENSE, experiment=None, config=CellConfig.model_validate(
        config.model_dump(mode="json")))
