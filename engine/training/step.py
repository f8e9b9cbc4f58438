"""One optimizer step over a global batch, through megatron-core's pipeline schedules.

The loss is token-averaged over the whole global batch: each micro-batch returns its loss *sum*
and valid-token count; megatron (calculate_per_token_loss) all-reduces the count over
data-parallel ranks and divides the gradients by it in finalize_model_grads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from engine.device import accelerator
from engine.model.gpt import SummedTokenLoss
from engine.training.data import MicroBatch


def _token_loss(loss_mask: torch.Tensor, inject_nan: bool, output):
    if isinstance(output, SummedTokenLoss):
        # The fused output layer + cross-entropy already summed over the loss mask.
        loss_sum, count = output.loss_sum.float(), output.num_tokens.float()
    else:
        mask = loss_mask.reshape(-1).float()
        loss_sum = (output.float().reshape(-1) * mask).sum()
        count = mask.sum()
    if inject_nan:  # as after a divergence: loss and every gradient non-finite
        loss_sum = loss_sum * float("nan")
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def _forward_step(data_iterator: Iterator[MicroBatch], model):
    # Built on the host (pinned); copied to the GPU right before its forward, as Megatron-LM's
    # get_batch does.
    batch = next(data_iterator).to_accelerator()
    # Per-token losses [b, s], or SummedTokenLoss when kernels.cross_entropy is "ours".
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels,
                   loss_mask=batch.loss_mask, packed_seq_params=batch.packed_seq_params())
    return output, partial(_token_loss, batch.loss_mask, batch.inject_nan)


@dataclass
class StepResult:
    loss: float  # token-averaged over the global batch
    num_tokens: int  # valid (loss-bearing) tokens in the global batch
    grad_norm: float
    lr: float
    skipped: bool


def train_step(model_chunks, optimizer, scheduler, micro_batches: Iterable[MicroBatch],
               num_microbatches: int, seq_length: int, micro_batch_size: int) -> StepResult:
    """Forward and backward over ``num_microbatches`` micro-batches, then one optimizer step.

    ``micro_batches`` yields this rank's micro-batches (the same list for every model chunk).
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    batches = list(micro_batches)
    iterators = [iter(batches) for _ in model_chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    lr = optimizer.param_groups[0]["lr"]  # the rate this step applies
    loss_sum, num_tokens = _reduce_losses(losses)
    loss = loss_sum / max(num_tokens, 1.0)
    if not math.isfinite(loss):
        # The gradients hold NaN/Inf too: drop them and leave weights, optimizer and schedule
        # untouched. Every rank sees the same reduced loss, so all skip together.
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(loss=loss, num_tokens=int(num_tokens), grad_norm=float("nan"),
                          lr=lr, skipped=True)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    return StepResult(
        loss=loss,
        num_tokens=int(num_tokens),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=lr,
        skipped=not update_ok,
    )


def _reduce_losses(losses: list) -> tuple[float, float]:
    """Sum (loss, tokens) over micro-batches and DP ranks; every rank gets the result."""
    # On the collective's device: NCCL takes GPU tensors only.
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for entry in losses:
            totals += entry["lm loss"].double()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
    # Only the last pipeline stage computed losses; share them with the other stages.
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return float(totals[0]), float(totals[1])
