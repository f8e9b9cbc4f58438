"""The training entry point: ``torchrun --nproc-per-node N -m engine.train --config FILE [k=v ...]``.

Reads YAML configs (engine/configs/), validates everything before any process group exists,
trains with megatron-core's schedules under the configured TP/PP/CP/DP layout, logs to the
console, metrics.jsonl and TensorBoard, checkpoints atomically, resumes from the latest
checkpoint of its directory, skips NaN steps, and on SIGTERM saves and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from engine.training.config import ConfigError, TrainConfig, load_config, validate_config
from engine.checkpoint import CheckpointError
from engine.parallel.layout import LayoutError


class TrainingStopped(RuntimeError):
    pass


def _is_logging_rank() -> bool:
    return dist.get_rank() == 0


def _print0(*parts) -> None:
    if _is_logging_rank():
        print(*parts, flush=True)


def model_flops_per_sequence(model, doc_lengths: np.ndarray) -> float:
    """Training FLOPs (forward + backward) of one packed sequence.

    Matmuls: 6 x tokens x parameters in linear layers (the output layer included, the embedding
    lookup not). Attention: only what the causal document mask keeps, l(l+1)/2 query-key pairs
    per document, 2 matmuls (QK^T, PV) of 2 FLOPs per multiply-add, times 3 for backward.
    """
    h, layers = model.hidden_size, model.num_layers
    kv = model.num_query_groups * model.head_dim
    linear_params = layers * (h * (h + 2 * kv) + h * h + 3 * h * model.ffn_hidden_size)
    linear_params += model.vocab_size * h
    tokens = float(doc_lengths.sum())
    pairs = float((doc_lengths.astype(np.float64) * (doc_lengths + 1) / 2).sum())
    attention = 3 * 2 * 2 * layers * h * pairs
    return 6.0 * tokens * linear_params + attention


class SampleSource:
    """Deterministic global batches from a packed dataset: sample j of step s is index
    (s x G + j) mod N, where a packed sequence longer than seq_length yields several samples."""

    def __init__(self, path: str, seq_length: int):
        from data_tools.packed import PackedDataset

        self.dataset = PackedDataset(path)
        self.seq_length = seq_length
        self.pieces = self.dataset.seq_length // seq_length
        self.num_samples = len(self.dataset) * self.pieces
        if self.num_samples == 0:
            raise ConfigError(f"data.path {path} holds no sequences")

    def sample(self, index: int):
        index %= self.num_samples
        sequence, piece = divmod(index, self.pieces)
        if self.pieces == 1:
            return self.dataset[sequence]
        start = piece * self.seq_length
        return self.dataset.get(sequence, start, start + self.seq_length)


def rank_micro_batches(source: SampleSource, config: TrainConfig, step: int, layout,
                       dp_rank: int, cp_rank: int, num_microbatches: int):
    """This rank's micro-batches of global batch ``step`` and the batch's doc lengths.

    Under context parallelism a rank reads only its own chunks of each sequence.
    """
    from engine.parallel.context.data import context_parallel_micro_batch
    from engine.training.data import attention_cost, balance_global_batch, build_micro_batch

    d = config.data
    indices = [(step * d.global_batch + j) % source.num_samples for j in range(d.global_batch)]
    cp = layout.context_parallel
    if cp > 1:  # one sample = one whole packed sequence (checked in validation)
        doc_lengths = [source.dataset.document_lengths(i) for i in indices]
    else:
        samples = [source.sample(i) for i in indices]
        doc_lengths = [s.doc_lengths for s in samples]
    if d.balance_attention:
        mine = balance_global_batch([attention_cost(lengths) for lengths in doc_lengths],
                                    layout.data_parallel, num_microbatches, d.micro_batch)[dp_rank]
    else:
        base = dp_rank * num_microbatches * d.micro_batch
        mine = [list(range(base + m * d.micro_batch, base + (m + 1) * d.micro_batch))
                for m in range(num_microbatches)]
    micro_batches = []
    for group in mine:
        if cp > 1:
            micro_batches.append(context_parallel_micro_batch(
                source.dataset, [indices[i] for i in group], cp_rank, cp,
                position_mode=d.position_mode, mask_cross_document=d.mask_cross_document))
            continue
        chosen = [samples[i] for i in group]
        micro_batches.append(build_micro_batch(
            [s.tokens for s in chosen], [s.doc_lengths for s in chosen],
            [None if s.loss_mask is None else s.loss_mask.astype(np.float32) for s in chosen],
            position_mode=d.position_mode, mask_cross_document=d.mask_cross_document))
    return micro_batches, doc_lengths


class MetricsLogger:
    """Console progress line, metrics.jsonl and TensorBoard scalars (rank 0 only)."""

    def __init__(self, log_dir: Path, total_steps: int, tensorboard: bool):
        self.total_steps = total_steps
        self.file = None
        self.writer = None
        if _is_logging_rank():
            log_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(log_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not _is_logging_rank():
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()
        width = len(str(self.total_steps))
        flag = " (skipped: non-finite loss)" if record.get("skipped") else ""
        print(f"step {record['step']:>{width}}/{self.total_steps} | loss {record['loss']:.4f} | "
              f"lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} | "
              f"{record['tokens_per_s']:,.0f} tok/s | {record['tflops_per_gpu']:.3f} TFLOP/s/GPU | "
              f"mem {record['memory_gb']:.2f} GB | {record['step_time_s']:.2f} s{flag}", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train(config: TrainConfig) -> int:
    from megatron.core import parallel_state

    from engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from engine.model.build import (
        TrainingPrecision,
        build_model_chunks,
        transformer_config,
        wrap_data_parallel,
    )
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.training.step import build_optimizer, train_step

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Every check that needs no process group, first.
    model, layout, seq_length, num_microbatches, kernels = validate_config(config, world_size)
    source = SampleSource(config.data.path, seq_length)
    if layout.context_parallel > 1 and source.pieces != 1:
        raise ConfigError(
            f"data.seq_length {seq_length} is below the packing length "
            f"{source.dataset.seq_length} of {config.data.path}; with context_parallel > 1 train "
            f"at the packing length (repack the data at {seq_length} tokens)")

    stop_requested = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.__setitem__("flag", True))

    initialize_parallel(layout, model, num_microbatches=num_microbatches, seed=config.seed,
                        timeout_s=config.collective_timeout_s)
    bf16 = config.bf16 if config.bf16 is not None else torch.cuda.is_available()
    ckpt_dir = Path(config.checkpoint.dir)
    log_dir = Path(config.logging.dir or ckpt_dir)
    if _is_logging_rank():
        log_dir.mkdir(parents=True, exist_ok=True)
        resolved = yaml.safe_dump(config.to_dict(), sort_keys=False)
        print(f"resolved config ({layout.describe()}, {world_size} processes):\n{resolved}",
              flush=True)
        (log_dir / "config.yaml").write_text(resolved)

    tconfig = transformer_config(model, layout, TrainingPrecision(bf16=bf16),
                                 recompute=config.recompute, kernels=kernels)
    chunks = wrap_data_parallel(
        build_model_chunks(model, tconfig, seed=config.seed, kernels=kernels,
                           cp_algorithm=config.parallel.cp_algorithm),
        tconfig, layout.distributed_optimizer)
    optimizer, scheduler = build_optimizer(
        chunks, config.optimizer.settings(config.train_steps),
        bf16=bf16, distributed_optimizer=layout.distributed_optimizer)

    start_step = 0
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = load_checkpoint(latest, chunks, optimizer, scheduler, model)
        start_step = state["step"]
        _print0(f"resumed from {latest} at step {start_step}")
    elif config.checkpoint.init_from:
        init = latest_checkpoint(config.checkpoint.init_from) or Path(config.checkpoint.init_from)
        # megatron keeps each group's max_lr/min_lr inside the optimizer state; the loaded ones
        # are the old run's, and this run's schedule must win.
        new_limits = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
        load_checkpoint(init, chunks, optimizer if config.checkpoint.init_load_optimizer else None,
                        scheduler=None, model_config=model, load_rng=False)
        for group, (max_lr, min_lr) in zip(optimizer.param_groups, new_limits):
            group["max_lr"], group["min_lr"] = max_lr, min_lr
        scheduler.step(increment=0)  # sets this run's first learning rate
        _print0(f"initialized from {init} (optimizer state: "
                f"{config.checkpoint.init_load_optimizer}); new RoPE base {model.rope_base:g}")

    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    logger = MetricsLogger(log_dir, config.train_steps, config.logging.tensorboard)
    consecutive_nan = 0
    step = start_step
    try:
        while step < config.train_steps:
            started = time.perf_counter()
            micro_batches, doc_lengths = rank_micro_batches(
                source, config, step, layout, dp_rank, cp_rank, num_microbatches)
            if step in config.inject_nan_steps:
                micro_batches[0].inject_nan = True
            result = train_step(chunks, optimizer, scheduler, micro_batches, num_microbatches,
                                seq_length, config.data.micro_batch)
            elapsed = time.perf_counter() - started
            step += 1
            tokens = config.data.global_batch * seq_length
            flops = sum(model_flops_per_sequence(model, lengths) for lengths in doc_lengths)
            if step % config.logging.interval == 0 or result.skipped:
                logger.log({
                    "step": step, "loss": result.loss, "lr": result.lr,
                    "grad_norm": result.grad_norm, "valid_tokens": result.num_tokens,
                    "tokens_per_s": tokens / elapsed,
                    "tflops_per_gpu": flops / elapsed / world_size / 1e12,
                    "memory_gb": _peak_memory_gb(), "step_time_s": elapsed,
                    "skipped": result.skipped,
                })
            consecutive_nan = consecutive_nan + 1 if result.skipped else 0
            if consecutive_nan >= config.max_consecutive_nan_steps:
                raise TrainingStopped(
                    f"{consecutive_nan} consecutive steps had a non-finite loss (last: step "
                    f"{step}); stopping. Check the data at these steps and lower optimizer.lr, "
                    f"or resume from {latest_checkpoint(ckpt_dir)}")
            interval = config.checkpoint.save_interval
            stop = _any_rank(stop_requested["flag"])
            if stop or step == config.train_steps or (interval and step % interval == 0):
                path = save_checkpoint(ckpt_dir, step, chunks, optimizer, scheduler, model,
                                       {"consumed_samples": step * config.data.global_batch},
                                       keep_last=config.checkpoint.keep_last)
                _print0(f"saved {path}")
            if stop:
                _print0(f"SIGTERM received: checkpoint saved at step {step}, exiting")
                break
    finally:
        logger.close()
    destroy_parallel()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train Llama-3 to long context (launch with torchrun).",
        epilog="Overrides: section.key=value, e.g. optimizer.lr=2e-5 parallel.tensor_parallel=2")
    parser.add_argument("--config", action="append", default=[], required=True,
                        help="YAML config; several are merged in order")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        return train(config)
    except (ConfigError, LayoutError, CheckpointError, TrainingStopped) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
