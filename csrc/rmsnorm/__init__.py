"""RMSNorm (Llama) with a Triton kernel and a plain-PyTorch reference.

Sequence parallelism: each tensor-parallel rank normalizes only its own tokens, so the weight
gradient computed here is a partial sum over those tokens. megatron-core all-reduces the gradients
of parameters that carry the attribute sequence_parallel=True over the tensor-parallel group
(finalize_model_grads); the engine's norm module (engine.model.norm.RMSNorm) sets that attribute.
Callers that are not megatron must all-reduce weight.grad over the TP group themselves.
"""
from __future__ import annotations

import torch

from csrc.rmsnorm.reference import reference_rms_norm
from csrc.triton_support import resolve_impl

__all__ = ["rms_norm", "reference_rms_norm"]

MAX_TRITON_HIDDEN = 16384  # one row lives in registers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, impl: str = "auto") -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight with fp32 accumulation.

    Args:
        x: [..., H] bf16/fp16/fp32 (fp64 for the reference); weight: [H]; eps: added to the mean square.
        impl: "auto" (Triton on CUDA, reference elsewhere) | "ours" | "torch".
    Returns: y [..., H] in x's dtype. weight's gradient is a local partial sum (see module doc).
    """
    resolved = resolve_impl(impl, x, "rms_norm")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [H] with H = x.shape[-1] = {x.shape[-1]}")
    if resolved == "torch":
        return reference_rms_norm(x, weight, eps)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1] > MAX_TRITON_HIDDEN:
        raise ValueError(
            f"rms_norm: the Triton kernel takes bf16/fp16/fp32 rows of at most {MAX_TRITON_HIDDEN}, got {x.dtype} "
            f"H={x.shape[-1]}; use impl='torch'"
        )
    from csrc.rmsnorm.triton_kernels import triton_rms_norm

    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    return triton_rms_norm(rows, weight.contiguous(), float(eps)).view(x.shape)
