"""Combine attention computed over disjoint key sets (context parallelism, split-KV) via their lse."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def merge_attention_outputs(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results of the same queries over disjoint sets of keys.

    Partial i is softmax attention over key set K_i: out_i = sum_{j in K_i} exp(s_j - lse_i) v_j.
    The attention over the union is out = sum_i exp(lse_i - lse) out_i with
    lse = log(sum_i exp(lse_i)). Rows that saw no key in any partial (all lse_i = -inf) give
    out = 0 and lse = -inf, and their gradients are 0, never NaN.

    Args:
        outs: n tensors [T, H, D] (any float dtype, all the same).
        lses: n tensors [H, T], natural-log log-sum-exp as returned by varlen_attention.

    Returns:
        out [T, H, D] in the dtype of outs[0], lse [H, T] fp32 (fp64 if the inputs are fp64).
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge_attention_outputs: got {len(outs)} outputs and {len(lses)} lses; pass one lse per output, at least one")
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if out.dim() != 3 or lse.shape != (out.shape[1], out.shape[0]):
            raise ValueError(
                f"merge_attention_outputs: partial {i} has out {tuple(out.shape)} and lse {tuple(lse.shape)}; "
                "expected out [T, H, D] and lse [H, T]"
            )
    acc_dtype = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    lse_stack = torch.stack([lse.to(acc_dtype) for lse in lses])  # [n, H, T]
    # The max shift does not change the result, so it carries no gradient; replacing -inf by 0
    # keeps exp(-inf - shift) = 0 instead of NaN for rows no partial saw.
    shift = lse_stack.detach().amax(dim=0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(lse_stack - shift)  # [n, H, T]
    total = weights.sum(dim=0)
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, shift + torch.log(total_safe), torch.full_like(total, -math.inf))
    scale = (weights / total_safe).permute(0, 2, 1).unsqueeze(-1)  # [n, T, H, 1]
    out = sum(scale[i] * outs[i].to(acc_dtype) for i in range(len(outs)))
    return out.to(outs[0].dtype), lse
