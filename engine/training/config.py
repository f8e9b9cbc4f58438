"""The training run's configuration: YAML files plus ``key.sub=value`` command-line overrides.

One dataclass per concern; everything is validated here, before any process group exists, with
messages that name the file, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


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


@dataclass
class ModelSection:
    name: str = "tiny"
    # Field overrides of the named LlamaConfig, e.g. {rope_base: 8.0e6, num_layers: 2}.
    overrides: dict = field(default_factory=dict)


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_stages: int = 1
    context_parallel: int = 1
    cp_algorithm: str = "all-gather"
    sequence_parallel: bool = False
    distributed_optimizer: bool = False


@dataclass
class DataSection:
    path: str = ""  # a packed dataset built by `lce-data mix` / `lce-data sft`
    seq_length: Optional[int] = None  # default: the dataset's packing length
    global_batch: int = 8  # sequences per optimizer step
    micro_batch: int = 1
    position_mode: str = "continuous"  # RoPE positions: "continuous" | "document"
    mask_cross_document: bool = True
    balance_attention: bool = False  # assign sequences to DP ranks/micro-batches by attention cost


@dataclass
class OptimizerSection:
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0

    def settings(self, train_steps: int):
        """The step-level OptimizerSettings: warm-up as a fraction of the run, decay over it."""
        from engine.training.step import OptimizerSettings

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "warmup_fraction"}
        return OptimizerSettings(warmup_steps=int(self.warmup_fraction * train_steps),
                                 decay_steps=train_steps, **fields)


@dataclass
class CheckpointSection:
    dir: str = ""  # where this run saves; resumes from its latest checkpoint if there is one
    save_interval: int = 0  # steps; 0 = only at the end and on SIGTERM
    keep_last: int = 2
    # Start a new run from another checkpoint (stage 1 -> stage 2): weights, and optionally the
    # optimizer state; the schedule and step count start fresh.
    init_from: str = ""
    init_load_optimizer: bool = True


@dataclass
class LoggingSection:
    dir: str = ""  # TensorBoard events, metrics.jsonl and the resolved config; default: checkpoint dir
    interval: int = 1
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    train_steps: int = 10
    seed: int = 1234
    bf16: Optional[bool] = None  # default: bf16 on GPU, fp32 on CPU
    recompute: Optional[str] = None  # None | "selective" | "full"
    # Kernel per model part (engine.model.kernels.KernelChoices): attention, rmsnorm, rope,
    # swiglu, cross_entropy; "auto" = ours on GPU, the PyTorch references on CPU.
    kernels: dict = field(default_factory=dict)
    max_consecutive_nan_steps: int = 3
    collective_timeout_s: float = 600.0
    # Test hook: poison the loss of these steps with NaN (exercises the skip logic).
    inject_nan_steps: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(text: str) -> Any:
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text


def _merge(target, updates: dict, where: str) -> None:
    for key, value in updates.items():
        if not hasattr(target, key):
            names = ", ".join(f.name for f in dataclasses.fields(target))
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {names}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
            _merge(current, value, f"{where}: {key}")
        else:
            setattr(target, key, value)


def load_config(paths: list[str], overrides: list[str] = ()) -> TrainConfig:
    """Merge YAML files in order, then ``a.b=value`` overrides (values parsed as YAML)."""
    config = TrainConfig()
    for path in paths:
        file = Path(path)
        if not file.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = _load_yaml(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _merge(config, data, path)
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
        _merge(config, nested, f"override {item!r}")
    return config


def validate_config(config: TrainConfig, world_size: int):
    """Check everything checkable without process groups; return (model, layout, dataset info).

    Raises ConfigError / LayoutError naming the file or value and the fix.
    """
    from engine.model.config import get_model_config
    from engine.parallel.layout import ParallelLayout

    try:
        model = get_model_config(config.model.name, **config.model.overrides)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model: {error}") from None
    p = config.parallel
    layout = ParallelLayout.for_world_size(
        world_size, tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel,
        context_parallel=p.context_parallel, virtual_stages=p.virtual_stages,
        sequence_parallel=p.sequence_parallel, distributed_optimizer=p.distributed_optimizer)

    d = config.data
    if not d.path:
        raise ConfigError("data.path is empty: point it at a packed dataset built by "
                          "`lce-data mix RECIPE --output DIR`")
    dataset_meta = Path(d.path) / "packed.json"
    if not dataset_meta.exists():
        raise ConfigError(f"data.path {d.path}: no packed dataset there ({dataset_meta} is "
                          f"missing); build it with `lce-data mix RECIPE --output {d.path}`")
    meta = json.loads(dataset_meta.read_text())
    packing_length = int(meta["seq_length"])
    seq_length = d.seq_length or packing_length
    if seq_length > packing_length:
        raise ConfigError(f"data.seq_length {seq_length} is larger than the packing length "
                          f"{packing_length} of {d.path}: repack with seq_length {seq_length} or "
                          f"lower data.seq_length")
    if packing_length % seq_length:
        raise ConfigError(f"data.seq_length {seq_length} does not divide the packing length "
                          f"{packing_length} of {d.path}")
    if d.position_mode not in ("continuous", "document"):
        raise ConfigError(f"data.position_mode {d.position_mode!r} must be 'continuous' or "
                          f"'document'")
    per_step = layout.data_parallel * d.micro_batch
    if d.global_batch % per_step:
        raise ConfigError(f"data.global_batch {d.global_batch} is not divisible by DP x "
                          f"micro_batch = {layout.data_parallel} x {d.micro_batch}")
    num_microbatches = d.global_batch // per_step
    layout.validate(model, world_size=world_size, num_microbatches=num_microbatches)
    from engine.model.kernels import KernelChoices, default_device
    from engine.parallel.context.chunks import validate_context_parallel

    if layout.context_parallel > 1:
        validate_context_parallel(layout.context_parallel, p.cp_algorithm, seq_length=seq_length,
                                  num_attention_heads=model.num_attention_heads,
                                  num_query_groups=model.num_query_groups,
                                  tensor_parallel=layout.tensor_parallel)
    try:
        kernels = KernelChoices(**config.kernels).resolve(default_device())
    except (TypeError, ValueError) as error:
        raise ConfigError(f"kernels: {error}") from None
    if config.recompute not in (None, "selective", "full"):
        raise ConfigError(f"recompute {config.recompute!r} must be null, 'selective' or 'full'")
    if not (0 <= config.optimizer.warmup_fraction < 1):
        raise ConfigError(f"optimizer.warmup_fraction {config.optimizer.warmup_fraction} must be "
                          f"in [0, 1)")
    if not math.isfinite(config.optimizer.lr) or config.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr {config.optimizer.lr} must be a positive number")
    if not config.checkpoint.dir:
        raise ConfigError("checkpoint.dir is empty: every run needs a directory to save into")
    if config.checkpoint.init_from:
        from engine.checkpoint import CheckpointError, check_compatible, latest_checkpoint

        source = Path(config.checkpoint.init_from)
        resolved = latest_checkpoint(source) or source
        try:
            check_compatible(resolved, model)
        except CheckpointError as error:
            raise ConfigError(f"checkpoint.init_from: {error}") from None
    return model, layout, seq_length, num_microbatches, kernels
