"""The training run's configuration: YAML files plus ``section.key=value`` command-line overrides.

One frozen dataclass per concern. ``load_config`` merges the files and overrides as plain
mappings, then builds the sections, checking every key, type and range with a message that
names the setting, the value and the fix. What needs more than one section (the layout against
the model, the batch against the data, the checkpoint to start from) is checked once, when the
run plan is built (engine.training.run_plan), still before any process group exists.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.parallel.layout import LayoutError, ParallelLayout

class ConfigError(ValueError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """YAML that reads 8e6 and 1.28e8 as numbers (YAML 1.1 wants 8.0e+6: RoPE bases written
    the natural way would otherwise arrive as strings)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[0-9][0-9_]*[eE][-+]?[0-9]+
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


# Ranges of numeric settings: (lowest allowed, whether the lowest is excluded).
_AT_LEAST_ONE = (1, False)
_NON_NEGATIVE = (0, False)
_POSITIVE = (0, True)

# Upper limits of numeric settings whose too-large values would only fail after the process
# group exists: seeds feed 64-bit RNG seeds after offsets are added (2**32 - 1 is every RNG's
# seed range), and a timeout becomes a 64-bit count of milliseconds.
_SEED_LIMIT = 2**32 - 1
_TIMEOUT_LIMIT_S = 1e6


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny"  # a named model config (engine/model/config.py MODEL_CONFIGS)
    # Field overrides of the named LlamaConfig, e.g. {rope_base: 8.0e6, num_layers: 2}.
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # a packed dataset built by `lce-data mix` / `lce-data sft`
    seq_length: Optional[int] = None  # default: the dataset's packing length
    global_batch: int = 8  # sequences per optimizer step
    micro_batch: int = 1  # sequences per forward/backward of one rank
    # RoPE positions continue across packed documents (ProLong) or restart at each document.
    position_mode: str = "continuous"
    # Mask the target of a document's last token (the next document's first).
    mask_cross_document: bool = True
    balance_attention: bool = False  # assign sequences to DP ranks/micro-batches by attention cost

    RANGES = {"seq_length": _AT_LEAST_ONE, "global_batch": _AT_LEAST_ONE,
              "micro_batch": _AT_LEAST_ONE}


@dataclass(frozen=True)
class OptimizerSection:
    """AdamW and its schedule: linear warm-up over ``warmup_fraction`` of the run, then cosine
    decay to ``lr x min_lr_ratio`` at its end."""

    lr: float = 1e-5  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr x min_lr_ratio (at most 1)
    warmup_fraction: float = 0.1  # warm-up steps: ceil(train_steps x warmup_fraction) (below 1)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW (below 1)
    beta2: float = 0.95  # AdamW (below 1)
    eps: float = 1e-8  # AdamW
    clip_grad: float = 1.0  # 0 turns clipping off

    RANGES = {"lr": _POSITIVE, "min_lr_ratio": _NON_NEGATIVE,
              "warmup_fraction": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
              "beta1": _NON_NEGATIVE, "beta2": _NON_NEGATIVE, "eps": _POSITIVE,
              "clip_grad": _NON_NEGATIVE}

    def check(self) -> None:
        if not self.warmup_fraction < 1:
            raise ConfigError(f"optimizer.warmup_fraction {self.warmup_fraction} must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                raise ConfigError(f"optimizer.{name} {getattr(self, name)} must be in [0, 1)")
        if self.min_lr_ratio > 1:
            raise ConfigError(f"optimizer.min_lr_ratio {self.min_lr_ratio} must be in [0, 1]")

    def warmup_steps(self, train_steps: int) -> int:
        # Rounded up, as Hugging Face's Trainer does (ProLong's SFT: 5% of 250 is 13 steps).
        return math.ceil(train_steps * self.warmup_fraction)


@dataclass(frozen=True)
class CheckpointSection:
    dir: str = ""  # where this run saves; resumes from its latest checkpoint if there is one
    save_interval: int = 0  # steps; 0 = only at the end and on SIGTERM
    keep_last: int = 2  # checkpoints kept (never the newest before the first skipped step)
    # Start a new run from another checkpoint (stage 1 -> stage 2): weights, and optionally the
    # optimizer state; the schedule and step count start fresh.
    init_from: str = ""
    init_load_optimizer: bool = True  # with init_from: also load its optimizer state

    RANGES = {"save_interval": _NON_NEGATIVE, "keep_last": _AT_LEAST_ONE}


@dataclass(frozen=True)
class LoggingSection:
    dir: str = ""  # TensorBoard events, metrics.jsonl and the resolved config; default: checkpoint dir
    interval: int = 1  # steps between progress lines and metrics records
    tensorboard: bool = True  # write TensorBoard scalars beside metrics.jsonl

    RANGES = {"interval": _AT_LEAST_ONE}


@dataclass(frozen=True)
class EvalSection:
    """Long-context evaluation (engine.evaluate): during training every ``interval`` steps, of a
    run's final checkpoint with ``final``, and by ``python -m engine.evaluate``."""

    # Validation loss during training: held-out packed data (`lce-data mix`), batches of
    # data.global_batch samples, every `interval` steps (0: never).
    data: str = ""
    interval: int = 0  # steps between validations during training (0: never)
    batches: int = 1  # validation batches of data.global_batch samples each
    # The recall suite. During training only `lengths` are run (keep them short).
    tokenizer: str = ""  # the model's own tokenizer, file or folder
    tasks: list = field(default_factory=list)  # recall tasks (default: all)
    lengths: list = field(default_factory=list)  # prompt lengths in tokens
    depths: Any = 3  # needle depths: a count swept over 0..1, or a list of fractions
    samples: int = 1  # examples per (task, length, depth)
    haystack: str = "noise"  # "noise" (RULER's), an indexed dataset prefix, or a text folder
    seed: int = 0  # the same seed gives the same examples
    # Loss by position: the first `position_length` tokens of up to `max_documents` documents of
    # at least that length from an indexed dataset.
    long_documents: str = ""
    position_length: int = 0  # tokens per long document (0: no loss by position)
    max_documents: int = 8  # long documents read at most
    # The mean loss of up to `max_short_documents` short documents (< position_length tokens).
    short_documents: str = ""
    max_short_documents: int = 64  # short documents read at most
    # Evaluate the final checkpoint of a training run with everything above, at `final_lengths`
    # (default `lengths`), into LOG_DIR/eval/ (report.json, report.md, PNG plots).
    final: bool = False
    final_lengths: list = field(default_factory=list)  # prompt lengths of the final evaluation
    # What `python -m engine.evaluate` runs: "ours" (every measure above), "ruler" (RULER's tasks
    # and metrics) or "helmet-recall" (HELMET's Recall tasks). The last two read `tokenizer`,
    # `tasks` (their own task names), `lengths`, `samples` and `seed` (the command's defaults:
    # 100 and 42) and are scored by greedy generation on a transformers model, so they run in
    # the command only; training always runs "ours".
    protocol: str = "ours"
    ruler_essays: str = ""  # protocol ruler: RULER's PaulGrahamEssays.json (the essay haystack)
    ruler_squad: str = ""  # protocol ruler: SQuAD v2's dev set (RULER's squad.json, qa_1)
    ruler_hotpotqa: str = ""  # protocol ruler: HotpotQA's distractor dev set (qa_2)
    ruler_words: str = ""  # protocol ruler: RULER's english_words.json (cwe at long lengths)
    # Protocol ruler: wrap each prompt in the tokenizer's chat template, as RULER does for
    # instruct models.
    chat_template: bool = False
    helmet_data: str = ""  # HELMET's data folder, from its scripts/download_data.sh

    RANGES = {"interval": _NON_NEGATIVE, "batches": _AT_LEAST_ONE, "samples": _AT_LEAST_ONE,
              "seed": _NON_NEGATIVE, "position_length": _NON_NEGATIVE,
              "max_documents": _AT_LEAST_ONE, "max_short_documents": _AT_LEAST_ONE}
    HIGHEST = {"seed": _SEED_LIMIT}

    @property
    def recall(self) -> bool:
        return bool(self.lengths or self.final_lengths)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    # The parallel layout (engine.parallel.layout), data_parallel derived from the world size
    # when the run plan is built.
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train_steps: int = 10  # optimizer steps of the run
    seed: int = 1234  # the initial weights and the RNG states
    bf16: Optional[bool] = None  # default: bf16 on GPU, fp32 on CPU
    # Kernel per model part (engine.model.kernel_choices.KernelChoices): attention, rmsnorm,
    # rope, swiglu, cross_entropy; "auto" = ours on GPU, the PyTorch references on CPU.
    kernels: dict = field(default_factory=dict)
    max_consecutive_nan_steps: int = 3  # non-finite-loss steps in a row that stop the run
    collective_timeout_s: float = 600.0  # every collective fails after this many seconds
    # Test hook: poison the loss of these steps with NaN (exercises the skip logic).
    inject_nan_steps: list = field(default_factory=list)

    RANGES = {"train_steps": _AT_LEAST_ONE, "seed": _NON_NEGATIVE,
              "max_consecutive_nan_steps": _AT_LEAST_ONE, "collective_timeout_s": _POSITIVE}
    HIGHEST = {"seed": _SEED_LIMIT, "collective_timeout_s": _TIMEOUT_LIMIT_S}

    def to_dict(self) -> dict:
        """The settings as a config file holds them (what load_config reads back)."""
        return _settings(self)


def _settings(section) -> dict:
    """dataclasses.asdict without the fields a section derives (not settings of a config)."""
    values = {}
    for f in dataclasses.fields(section):
        if f.name in getattr(section, "DERIVED", ()):
            continue
        value = getattr(section, f.name)
        values[f.name] = _settings(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return values


def _type_matches(value: Any, hint) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _build(cls, values: dict, where: str):
    """An instance of section ``cls`` from a mapping, every key, type and range checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    derived = getattr(cls, "DERIVED", ())
    names = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
    for key in values:
        if key in derived:
            raise ConfigError(f"{where}.{key} is not a setting: it is derived from the number "
                              f"of processes; remove it")
    unknown = [key for key in values if key not in names]
    if unknown:
        section = f"section {where}" if where else "the top level"
        raise ConfigError(f"unknown setting {unknown[0]!r} in {section}; known: "
                          f"{', '.join(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        label = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, label)
            continue
        if not _type_matches(value, hint):
            raise ConfigError(f"{label} = {value!r} must be {_type_name(hint)}")
        if hint is float or typing.get_origin(hint) is typing.Union and float in typing.get_args(hint):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{label} = {value!r} must be a finite number")
        lowest, strict = getattr(cls, "RANGES", {}).get(name, (None, False))
        if lowest is not None and value is not None and (value < lowest or strict and value == lowest):
            bound = f"> {lowest}" if strict else f">= {lowest}"
            raise ConfigError(f"{label} = {value!r} must be {bound}")
        highest = getattr(cls, "HIGHEST", {}).get(name)
        if highest is not None and value is not None and value > highest:
            raise ConfigError(f"{label} = {value!r} must be <= {highest:.15g}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except LayoutError as error:
        # The layout checks its own fields, naming the field first: add the section.
        raise LayoutError(f"{where}.{error}") from None


def config_from_dict(values: dict) -> TrainConfig:
    config = _build(TrainConfig, values, "")
    config.optimizer.check()
    return config


def _parse_value(text: str) -> Any:
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text


def _deep_merge(target: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value


def read_config_file(path: str) -> Any:
    """The YAML document of one config file, or a ConfigError naming the file and the fix."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {path} does not exist: give the path of a YAML file, "
                          f"e.g. one of engine/configs/")
    if file.is_dir():
        raise ConfigError(f"config file {path} is a directory: give a YAML file in it")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte "
                          f"{error.start}): give a YAML file") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror}): fix its "
                          f"permissions or give another file") from None
    try:
        return _load_yaml(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_config(paths: list[str], overrides: list[str] = ()) -> TrainConfig:
    """Merge YAML files in order, then ``a.b=value`` overrides (values parsed as YAML)."""
    merged: dict = {}
    for path in paths:
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _deep_merge(merged, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = _parse_value(text)
        _deep_merge(merged, nested)
    source = ", ".join(paths) if paths else "config"
    try:
        return config_from_dict(merged)
    except (ConfigError, LayoutError) as error:
        raise type(error)(f"{source}: {error}") from None
