"""Fused output layer + cross-entropy that never materializes the [tokens, vocab] logits.

    loss_sum, n_valid = fused_linear_cross_entropy(hidden, weight, labels, loss_mask)
    loss = loss_sum / n_valid      # token-averaged (divide after any data-parallel all-reduce)

impl="torch" is plain PyTorch (reference.py, the specification), impl="ours" the chunked
kernel (triton_kernels.py), impl="auto" Triton on CUDA and the reference elsewhere.

    token_loss, argmax = linear_token_scores(hidden, weight, labels)   # evaluation, no grad
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from csrc.linear_cross_entropy.reference import (
    IGNORE_INDEX,
    counted_tokens,
    linear_token_scores,
    reference_linear_cross_entropy,
    vocab_shard_start,
)
from csrc.triton_support import resolve_impl, values_readable

__all__ = ["fused_linear_cross_entropy", "reference_linear_cross_entropy", "linear_token_scores",
           "default_chunk_size", "IGNORE_INDEX"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_local: int) -> int:
    """Tokens per chunk so that one logits chunk is about half the size of the hidden states.

    That keeps the fused op within ~10% of its memory floor (hidden + weight + their gradients)
    while each chunk's GEMM stays large (Llama-3 8B at 64K tokens: 1024 x 128,256 x 4096).
    """
    target = max(1, n_tokens * hidden_size // (2 * vocab_local))
    return int(min(max(1 << (target.bit_length() - 1), 256), 8192))


def _validate(hidden, weight, labels, loss_mask, tp_group, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V_local, H]; "
            "flatten [seq, batch, H] to [T, H] first"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hidden {hidden.dtype} and weight {weight.dtype} must share one dtype of {SUPPORTED_DTYPES}")
    if labels.shape != (hidden.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    vocab = weight.shape[0] * (1 if tp_group is None else dist.get_world_size(tp_group))
    if labels.numel() and values_readable(labels):  # not on a dry run's meta tensors
        real = labels.masked_fill(labels == IGNORE_INDEX, 0)
        low, high = torch.stack([real.min(), real.max()]).tolist()  # one host sync
        if low < 0 or high >= vocab:
            raise ValueError(
                f"label {low if low < 0 else high} is outside the vocabulary [0, {vocab}) and is not the ignore "
                f"index {IGNORE_INDEX}; check the tokenizer's vocabulary size against the output layer"
            )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits = hidden @ weight.T over counted tokens, without full logits.

    Args:
        hidden: [T, H] final hidden states (bf16/fp16/fp32), replicated over tp_group.
        weight: [V_local, H] output-layer rows of this rank: vocabulary ids
            [rank * V_local, (rank + 1) * V_local) of tp_group (all of them when tp_group is None).
        labels: int64 [T] target ids; -100 = not counted.
        loss_mask: [T] 0/1 (bool or float; nonzero = counted) or None.
        tp_group: torch.distributed process group splitting the vocabulary, or None.
        chunk_size: tokens per logits chunk; None = default_chunk_size(...).
        impl: "auto" | "ours" | "torch".

    Returns:
        loss_sum: fp32 scalar, differentiable, summed over counted tokens (natural log).
        n_valid: int64 scalar, number of counted tokens.
        Under tensor parallelism hidden's gradient is this rank's partial sum (its vocabulary
        shard's contribution); the caller all-reduces it over tp_group, as megatron's
        copy_to_tensor_model_parallel_region does in backward.
    """
    resolved = resolve_impl(impl, hidden, "fused_linear_cross_entropy")
    _validate(hidden, weight, labels, loss_mask, tp_group, chunk_size)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    if resolved == "torch":
        return reference_linear_cross_entropy(hidden, weight, labels, loss_mask, tp_group, chunk)
    from csrc.linear_cross_entropy.triton_kernels import fused_linear_cross_entropy_loss

    counted = counted_tokens(labels, loss_mask)
    target_col = labels - vocab_shard_start(weight, tp_group)
    in_shard = counted & (target_col >= 0) & (target_col < weight.shape[0])
    target_col = torch.where(in_shard, target_col, torch.full_like(target_col, -1))
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    loss_sum = fused_linear_cross_entropy_loss(hidden, weight, target_col, counted, tp_group, chunk)
    return loss_sum, counted.sum()
