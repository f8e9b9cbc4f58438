"""The run plan: everything a run is, resolved and validated once, before any process group.

    plan = plan_from_config(load_config(["stage1.yaml"]), world_size=8)   # engine.train
    plan = RunPlan.create(model, layout, seq_length=64, global_batch=8)   # tools, tests

Building it checks the layout against the model, the batch against the layout, the sequence
length against the data and the CP split, the data's token ids against the vocabulary, the
checkpoint to start from against the model shape, and resolves the kernels for this machine.
Everything downstream (process groups, the model build, the data path, the training loop,
evaluation) takes the plan and trusts it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from data_tools.outputs import OutputError, check_output_location
from data_tools.packed_dataset import METADATA_FILE, PackedDataset
from data_tools.stats import recorded_tokenizer
from data_tools.summary import describe_tokenizer, tokenizer_difference
from engine.checkpoint import (
    CheckpointError,
    DamagedCheckpoint,
    check_compatible,
    latest_checkpoint,
    resume_candidates,
)
from engine.model.config import LlamaConfig, get_model_config
from engine.model.kernel_choices import KernelChoices, default_device
from engine.model.specs import transformer_engine_available
from engine.parallel.layout import ParallelLayout
from engine.training.config import (
    CheckpointSection,
    ConfigError,
    LoggingSection,
    OptimizerSection,
    TrainConfig,
)
from engine.training.data import check_position_mode


@dataclass(frozen=True)
class DataPlan:
    """Where the training samples come from and how they become micro-batches."""

    path: str
    packing_length: int  # tokens per packed sequence on disk; samples cut it into equal pieces
    position_mode: str = "continuous"
    mask_cross_document: bool = True
    balance_attention: bool = False
    # The tokenizer record (TextTokenizer.describe()) of the dataset, else of the checkpoint
    # the run starts from; its checkpoints keep it, so that a run or an evaluation on other
    # ids can be refused. None: neither records one.
    tokenizer: Optional[dict] = None


@dataclass(frozen=True)
class RunPlan:
    model: LlamaConfig
    layout: ParallelLayout
    kernels: KernelChoices  # resolved for this machine: no "auto"
    seq_length: int  # tokens per sample
    global_batch: int  # samples per optimizer step
    micro_batch: int = 1
    bf16: bool = False
    use_transformer_engine: bool = False  # transformer-engine layer specs (GPU, when installed)
    seed: int = 1234
    train_steps: int = 1
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    collective_timeout_s: float = 600.0
    data: Optional[DataPlan] = None
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    max_consecutive_nan_steps: int = 3
    inject_nan_steps: tuple = ()

    def __post_init__(self):
        if not self.kernels.resolved:
            raise ConfigError(f"kernels {self.kernels.describe()} are not resolved; build the "
                              f"plan with RunPlan.create or plan_from_config")
        per_step = self.layout.data_parallel * self.micro_batch
        if self.global_batch % per_step:
            raise ConfigError(f"data.global_batch {self.global_batch} is not divisible by DP x "
                              f"micro_batch = {self.layout.data_parallel} x {self.micro_batch}")
        self.layout.validate(self.model, num_microbatches=self.num_microbatches,
                             seq_length=self.seq_length)
        if self.layout.context_parallel > 1 and self.kernels.attention == "transformer-engine":
            raise ConfigError("kernels.attention 'transformer-engine' has no context-parallel "
                              "path here: use 'ours', 'flash-attn' or 'torch' with "
                              "context_parallel > 1")
        if self.seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"seq_length {self.seq_length} is beyond the model's max_position_embeddings "
                f"{self.model.max_position_embeddings}: raise model.overrides."
                f"max_position_embeddings (RoPE has no table to outgrow) or train shorter")

    @classmethod
    def create(cls, model: LlamaConfig, layout: ParallelLayout, *, seq_length: int,
               global_batch: int, kernels: Optional[KernelChoices] = None,
               bf16: Optional[bool] = None, device: Optional[torch.device] = None,
               **settings) -> "RunPlan":
        """A plan with the kernels resolved for ``device`` (default: CUDA if present, else CPU)
        and bf16 defaulting to the device (bf16 on GPU, fp32 on CPU)."""
        device = device or default_device()
        kernels = kernels or KernelChoices()
        try:
            resolved = kernels.resolve(device, head_dim=model.head_dim)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls(model=model, layout=layout, kernels=resolved, seq_length=seq_length,
                   global_batch=global_batch,
                   bf16=device.type == "cuda" if bf16 is None else bf16,
                   # transformer-engine's linears carry their own fused RMSNorm: taken on GPUs
                   # unless the config asks for our norm kernel by name (describe() says so).
                   use_transformer_engine=(transformer_engine_available()
                                           and device.type == "cuda"
                                           and kernels.rmsnorm != "ours"),
                   **settings)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.layout.data_parallel * self.micro_batch)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def warmup_steps(self) -> int:
        return self.optimizer.warmup_steps(self.train_steps)

    def replace(self, **changes) -> "RunPlan":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        return (f"{self.layout.describe()}, {self.global_batch} x {self.seq_length} tokens per "
                f"step ({self.num_microbatches} micro-batches of {self.micro_batch}), "
                f"{'bf16' if self.bf16 else 'fp32'}, kernels {self.kernels.describe()}, "
                f"{self.model.describe_rope()}"
                f"{'' if self.model.untie_embeddings else ', tied embeddings'}"
                + (", transformer-engine linears with their fused RMSNorm in place of "
                   "kernels.rmsnorm (set kernels.rmsnorm: ours to keep ours)"
                   if self.use_transformer_engine else ""))


def _model_from_config(config: TrainConfig) -> LlamaConfig:
    try:
        return get_model_config(config.model.name, **config.model.overrides)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model: {error}") from None


def _data_plan(config: TrainConfig, model: LlamaConfig) -> tuple[DataPlan, int]:
    """(the data plan, the sample length) after checking the dataset against the config."""
    d = config.data
    if not d.path:
        raise ConfigError("data.path is empty: point it at a packed dataset built by "
                          "`lce-data mix RECIPE --output DIR`")
    if not (Path(d.path) / METADATA_FILE).exists():
        raise ConfigError(f"data.path {d.path}: no packed dataset there ({Path(d.path) / METADATA_FILE} "
                          f"is missing); build it with `lce-data mix RECIPE --output {d.path}`")
    try:
        dataset = PackedDataset(d.path)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"data.path {d.path}: {error}") from None
    if len(dataset) == 0:
        raise ConfigError(f"data.path {d.path} holds no sequences; rebuild it with more data or "
                          f"a shorter seq_length")
    packing_length = dataset.seq_length
    seq_length = d.seq_length or packing_length
    if seq_length > packing_length:
        raise ConfigError(f"data.seq_length {seq_length} is larger than the packing length "
                          f"{packing_length} of {d.path}: repack with seq_length {seq_length} or "
                          f"lower data.seq_length")
    if packing_length % seq_length:
        raise ConfigError(f"data.seq_length {seq_length} does not divide the packing length "
                          f"{packing_length} of {d.path}")
    try:
        check_position_mode(d.position_mode)
    except ValueError as error:
        raise ConfigError(f"data.{error}") from None
    largest = getattr(dataset, "max_token_id", None)
    if largest is not None and largest >= model.vocab_size:
        raise ConfigError(
            f"data.path {d.path} holds token id {largest}, beyond the vocabulary of "
            f"{model.vocab_size} of model {config.model.name}: the data was tokenized for another "
            f"model; re-tokenize it with this model's tokenizer or pick the matching model")
    try:
        tokenizer = recorded_tokenizer(d.path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.path {d.path}: its tokenizer record cannot be read ({error}); "
                          f"rebuild the dataset with `lce-data mix`") from None
    return DataPlan(d.path, packing_length, d.position_mode, d.mask_cross_document,
                    d.balance_attention, tokenizer), seq_length


def _check_run_directories(config: TrainConfig) -> None:
    """The checkpoint and log directories can be created and written: found now, not after
    the process group exists (or after the last step, when the first save comes)."""
    log_files = ("config.yaml", "metrics.jsonl")
    places = [("checkpoint.dir", config.checkpoint.dir,
               ("latest",) + (() if config.logging.dir else log_files))]
    if config.logging.dir:
        places.append(("logging.dir", config.logging.dir, log_files))
    for setting, folder, files in places:
        for name in files:
            try:
                check_output_location(str(Path(folder) / name), setting, ("",))
            except OutputError as error:
                raise ConfigError(str(error)) from None


def _check_checkpoint_tokenizer(setting: str, path, state: dict, data: DataPlan) -> None:
    """Refuse continuing from a checkpoint whose tokenizer gives other ids than the data's
    (data_tools.summary.tokenizer_difference: one vocabulary in two file formats is one
    tokenizer); a checkpoint or dataset recording none (written before they did) passes, noted."""
    saved = state.get("tokenizer")
    if not saved or not data.tokenizer:
        missing = [f"{what} {where}" for what, where, record in (
            (setting, path, saved), ("data.path", data.path, data.tokenizer)) if not record]
        print(f"note: {' and '.join(missing)} record(s) no tokenizer; not checked that "
              f"{setting} {path} was trained on the data's tokenizer", flush=True)
        return
    difference = tokenizer_difference(saved, data.tokenizer)
    if difference:
        raise ConfigError(
            f"{setting}: checkpoint {path} was trained with tokenizer "
            f"{describe_tokenizer(saved)}, but data.path {data.path} holds ids of tokenizer "
            f"{describe_tokenizer(data.tokenizer)} ({difference}): re-tokenize the data with "
            f"the checkpoint's tokenizer, or start from a checkpoint of the data's tokenizer")


def _check_resume_shape(ckpt_dir: str, model: LlamaConfig,
                        data: Optional[DataPlan] = None) -> Optional[dict]:
    """A run directory holding checkpoints of another model shape (or, with ``data``, of
    another tokenizer) is refused here, before anything is written into it: the resume would
    refuse it only after the process group exists. Damaged checkpoints are left to the resume,
    which skips them for older ones. Returns the engine state of the one it would resume."""
    try:
        candidates = resume_candidates(ckpt_dir) if Path(ckpt_dir).is_dir() else []
        for path in candidates:
            if not path.is_dir():  # a missing `latest` target: the resume reports it
                continue
            try:
                state = check_compatible(path, model)
            except DamagedCheckpoint:
                continue
            if data is not None:
                _check_checkpoint_tokenizer("checkpoint.dir", path, state, data)
            return state
    except CheckpointError as error:
        raise ConfigError(f"checkpoint.dir {ckpt_dir} would be resumed from: {error}; or give "
                          f"another checkpoint.dir to start a new run") from None
    return None


def plan_from_config(config: TrainConfig, world_size: int,
                     device: Optional[torch.device] = None, with_data: bool = True) -> RunPlan:
    """The run plan of a training config on ``world_size`` processes; raises ConfigError or
    LayoutError naming the setting, the value and the fix. Without ``with_data`` (a dry run)
    neither the dataset nor the checkpoint to start from is read: samples are
    data.seq_length (default: the model's max_position_embeddings) tokens long."""
    model = _model_from_config(config)
    layout = config.parallel.with_world_size(world_size)
    if with_data:
        data, seq_length = _data_plan(config, model)
    else:
        seq_length = config.data.seq_length or model.max_position_embeddings
        data = DataPlan(config.data.path, seq_length, config.data.position_mode,
                        config.data.mask_cross_document, config.data.balance_attention)
    if not config.checkpoint.dir:
        raise ConfigError("checkpoint.dir is empty: every run needs a directory to save into")
    started = None  # the engine state of the checkpoint the run starts from
    if with_data:
        # A dry run writes nothing and reads no checkpoint.
        _check_run_directories(config)
        started = resumed = _check_resume_shape(config.checkpoint.dir, model, data)
    if config.checkpoint.init_from and with_data:
        source = Path(config.checkpoint.init_from)
        try:
            start = latest_checkpoint(source) or source
            state = check_compatible(start, model)
        except CheckpointError as error:
            raise ConfigError(f"checkpoint.init_from: {error}") from None
        _check_checkpoint_tokenizer("checkpoint.init_from", start, state, data)
        started = resumed or state  # a resume continues the run directory, not init_from
    if data.tokenizer is None and started and started.get("tokenizer"):
        # Data that records no tokenizer: the checkpoints keep the one the run started from.
        data = dataclasses.replace(data, tokenizer=started["tokenizer"])
    try:
        kernels = KernelChoices(**config.kernels)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"kernels: {error}") from None
    return RunPlan.create(
        model, layout, seq_length=seq_length, global_batch=config.data.global_batch,
        micro_batch=config.data.micro_batch, kernels=kernels, bf16=config.bf16, device=device,
        seed=config.seed, train_steps=config.train_steps, optimizer=config.optimizer,
        collective_timeout_s=config.collective_timeout_s, data=data,
        checkpoint=config.checkpoint, logging=config.logging,
        max_consecutive_nan_steps=config.max_consecutive_nan_steps,
        inject_nan_steps=tuple(config.inject_nan_steps))
