"""What a run reports: FLOPs of packed sequences, and the console / metrics.jsonl / TensorBoard log."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.model.config import LlamaConfig


def training_flops(model: LlamaConfig, doc_lengths: np.ndarray) -> float:
    """Training FLOPs (forward + backward) of one packed sequence.

    Matmuls: 6 x tokens x parameters in linear layers (the output layer included, the embedding
    lookup not). Attention: only what the causal document mask keeps, l(l+1)/2 query-key pairs
    per document, 2 matmuls (QK^T, PV) of 2 FLOPs per multiply-add, times 3 for backward.
    """
    linear = model.num_layers * model.linear_parameters_per_layer()
    linear += model.vocab_size * model.hidden_size
    lengths = np.asarray(doc_lengths, dtype=np.float64)
    pairs = float((lengths * (lengths + 1) / 2).sum())
    attention = 3 * 2 * 2 * model.num_layers * model.hidden_size * pairs
    return 6.0 * float(lengths.sum()) * linear + attention


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or without a GPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*parts) -> None:
    if is_logging_rank():
        print(*parts, flush=True)


class MetricsLogger:
    """Console progress line, metrics.jsonl and TensorBoard scalars (rank 0 only).

    ``log(record)`` takes a training step's record; ``log_eval(step, values)`` a validation
    result, written as {"step": .., "eval/NAME": ..} lines and TensorBoard's eval/ scalars.
    """

    def __init__(self, log_dir: Path, total_steps: int, tensorboard: bool):
        self.total_steps = total_steps
        self.file = None
        self.writer = None
        if is_logging_rank():
            log_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(log_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: seconds

                self.writer = SummaryWriter(str(log_dir / "tensorboard"))

    def _write(self, record: dict, prefix: str) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    name = key if "/" in key else f"{prefix}/{key}"
                    self.writer.add_scalar(name, value, record["step"])
            self.writer.flush()

    def log(self, record: dict) -> None:
        if not is_logging_rank():
            return
        self._write(record, "train")
        width = len(str(self.total_steps))
        flag = " (skipped: non-finite loss)" if record.get("skipped") else ""
        print(f"step {record['step']:>{width}}/{self.total_steps} | loss {record['loss']:.4f} | "
              f"lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} | "
              f"{record['tokens_per_s']:,.0f} tok/s | {record['tflops_per_gpu']:.3f} TFLOP/s/GPU | "
              f"mem {record['memory_gb']:.2f} GB | {record['step_time_s']:.2f} s{flag}", flush=True)

    def log_eval(self, step: int, values: dict) -> None:
        if not is_logging_rank():
            return
        self._write({"step": step, **{f"eval/{k}": v for k, v in values.items()}}, "eval")
        shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in values.items())
        print(f"eval at step {step} | {shown}", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()
