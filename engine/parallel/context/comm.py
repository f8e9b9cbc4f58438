"""Communication of context-parallel attention, as autograd functions.

Both act on dimension 0 (the sequence dimension in megatron's [s, b, ...] layout) and use the
collectives gloo and NCCL share (all_gather_into_tensor, reduce_scatter_tensor,
all_to_all_single). Every process group the engine builds carries a timeout
(engine.parallel.setup), so a dead peer fails these calls instead of hanging them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherSequence(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: reduce-scatter (sum) along dim 0.

    Every rank's attention reads every rank's keys, so the gradient of a rank's K/V shard is the
    sum of the gradients all ranks computed for it: exactly a reduce-scatter.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        local = local.contiguous()
        gathered = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, local, group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        grad_gathered = grad_gathered.contiguous()
        grad_local = grad_gathered.new_empty((grad_gathered.shape[0] // size,
                                              *grad_gathered.shape[1:]))
        dist.reduce_scatter_tensor(grad_local, grad_gathered, op=dist.ReduceOp.SUM,
                                   group=ctx.group)
        return grad_local, None


def all_gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...], rank i's block at [i * n, (i + 1) * n).

    Differentiable: the backward reduce-scatters the gradient (sums every rank's contribution).
    """
    return _AllGatherSequence.apply(local, group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on dim-0 blocks; block i goes to rank i, and arrives as block <sender>.

    The exchange is its own inverse (what rank j sent as block i comes back from rank i as
    block j), so the backward is the same call on the gradient.
    """

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        blocks = blocks.contiguous()
        out = torch.empty_like(blocks)
        dist.all_to_all_single(out, blocks, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        grad_blocks = torch.empty_like(grad_out)
        dist.all_to_all_single(grad_blocks, grad_out, group=ctx.group)
        return grad_blocks, None


def ulysses_all_to_all(blocks: torch.Tensor, group) -> torch.Tensor:
    """Exchange ``blocks`` [world, ...]: block i goes to rank i; returns the blocks received,
    block j from rank j. Differentiable (the backward is the reverse exchange)."""
    if blocks.shape[0] != dist.get_world_size(group):
        raise ValueError(f"ulysses_all_to_all needs one block per rank: got {blocks.shape[0]} "
                         f"blocks for a group of {dist.get_world_size(group)}")
    return _AllToAll.apply(blocks, group)
