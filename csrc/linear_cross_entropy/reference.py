"""Plain-PyTorch output layer + cross-entropy: the specification of the fused kernel.

loss_sum = sum over counted tokens t of (logsumexp_v(h_t . w_v) - h_t . w_{label_t}), with the
vocabulary optionally split over a tensor-parallel group: rank r holds rows
[r * V_local, (r + 1) * V_local) of the weight, and the row max, the sum of exponentials and the
target logit are all-reduced over the group (Megatron's vocab-parallel cross-entropy).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


def counted_tokens(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """bool [T]: tokens that enter the loss (label != -100 and loss_mask != 0)."""
    valid = labels != IGNORE_INDEX
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    return valid


def vocab_shard_start(weight: torch.Tensor, tp_group) -> int:
    """First vocabulary id held by this rank's weight shard."""
    return 0 if tp_group is None else dist.get_rank(tp_group) * weight.shape[0]


def sum_over_group_keep_local_grad(x: torch.Tensor, tp_group) -> torch.Tensor:
    """The group-wide sum of x whose gradient flows only into this rank's x.

    Every rank computes the same (replicated) loss, so the gradient of that loss with respect to
    this rank's partial is exactly d loss / d total: no communication is needed in backward.
    """
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=tp_group)
    return x + (total - x.detach())


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of logits = hidden @ weight.T, computed chunk by chunk.

    Args:
        hidden: [T, H]; weight: [V_local, H] (this rank's vocabulary rows); labels: int64 [T],
            -100 = ignored; loss_mask: [T] 0/1 (bool or float) or None.
        tp_group: torch.distributed group over which the vocabulary is split, or None.
        chunk_size: tokens per logits chunk (autograd still keeps every chunk's logits).

    Returns:
        loss_sum fp32 scalar (natural log, summed over counted tokens; differentiable),
        n_valid int64 scalar (counted tokens). The token-averaged loss is loss_sum / n_valid.
        Under tensor parallelism the gradient of hidden is this rank's partial sum: the caller
        all-reduces it over tp_group (megatron's copy_to_tensor_model_parallel_region does).
    """
    valid = counted_tokens(labels, loss_mask)
    vocab_local = weight.shape[0]
    vocab_start = vocab_shard_start(weight, tp_group)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for c0 in range(0, hidden.shape[0], chunk_size):
        c1 = min(c0 + chunk_size, hidden.shape[0])
        logits = (hidden[c0:c1] @ weight.t()).float()  # [C, V_local]
        chunk_valid = valid[c0:c1]
        local_label = labels[c0:c1] - vocab_start
        in_shard = chunk_valid & (local_label >= 0) & (local_label < vocab_local)
        target = logits.gather(1, local_label.clamp(0, vocab_local - 1).unsqueeze(1)).squeeze(1)
        target = torch.where(in_shard, target, torch.zeros_like(target))
        row_max = logits.detach().amax(dim=1)  # shift only: carries no gradient
        if tp_group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp = torch.exp(logits - row_max.unsqueeze(1)).sum(dim=1)
        if tp_group is not None:
            sum_exp = sum_over_group_keep_local_grad(sum_exp, tp_group)
            target = sum_over_group_keep_local_grad(target, tp_group)
        token_loss = torch.log(sum_exp) + row_max - target
        loss_sum = loss_sum + torch.where(chunk_valid, token_loss, torch.zeros_like(token_loss)).sum()
    return loss_sum, valid.sum()


# Logits elements per scoring chunk: 128 MiB of fp32 whatever the vocabulary shard, so memory
# stays flat in the sequence length (261 tokens per chunk at Llama-3's 128,256 ids).
SCORE_CHUNK_ELEMENTS = 1 << 25


@torch.no_grad()
def linear_token_scores(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        tp_group=None, vocab_size: int | None = None,
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and argmax of logits = hidden @ weight.T, chunk by chunk, for
    evaluation (no gradient; never more than one [chunk, V_local] block of logits).

    Args:
        hidden: [T, H]; weight: [V_local, H] (this rank's vocabulary rows); labels: int64 [T]
            (any id for positions whose loss is not wanted: their loss is still computed).
        tp_group: group over which the vocabulary is split, or None.
        vocab_size: ids at or beyond it (tensor-parallel padding rows) are never predicted and do
            not enter the softmax; default every row.
        chunk_size: tokens per logits block (default: SCORE_CHUNK_ELEMENTS / V_local).

    Returns:
        token_loss fp32 [T] (natural log), argmax int64 [T]: the most likely id over the whole
        vocabulary, the lowest such id on ties (as torch.argmax and greedy decoding pick),
        identical on every rank of ``tp_group``.
    """
    vocab_local = weight.shape[0]
    vocab_start = vocab_shard_start(weight, tp_group)
    usable = vocab_local if vocab_size is None else max(0, min(vocab_local, vocab_size - vocab_start))
    chunk_size = chunk_size or max(16, SCORE_CHUNK_ELEMENTS // vocab_local)
    losses, best = [], []
    for c0 in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[c0:c0 + chunk_size] @ weight.t()).float()  # [C, V_local]
        if usable < vocab_local:
            logits[:, usable:] = float("-inf")
        local_label = labels[c0:c0 + chunk_size] - vocab_start
        in_shard = (local_label >= 0) & (local_label < usable)
        target = logits.gather(1, local_label.clamp(0, vocab_local - 1).unsqueeze(1)).squeeze(1)
        target = torch.where(in_shard, target, torch.zeros_like(target))
        local_max, local_arg = logits.max(dim=1)
        row_max = local_max.clone()
        if tp_group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)  # in place: one block
        # The lowest global id among the ranks holding the maximum.
        candidate = torch.where(local_max == row_max, local_arg + vocab_start,
                                torch.full_like(local_arg, torch.iinfo(torch.int64).max))
        if tp_group is not None:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=tp_group)
            dist.all_reduce(target, op=dist.ReduceOp.SUM, group=tp_group)
            dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=tp_group)
        losses.append(torch.log(sum_exp) + row_max - target)
        best.append(candidate)
    if not losses:  # no token to score (e.g. a context-parallel rank without answer tokens)
        return (torch.empty(0, device=hidden.device),
                torch.empty(0, dtype=torch.int64, device=hidden.device))
    return torch.cat(losses), torch.cat(best)
