"""Rotary position embedding with per-token positions (packed documents restart at 0).

    q = apply_rope(q, positions, base=500000.0)              # angles computed from positions
    q = apply_rope(q, positions, 500000.0, scaling={"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192})          # Llama-3.1's RoPE
    q = apply_rope_cos_sin(q, *rope_cos_sin(positions, 128, 500000.0))   # precomputed tables

impl="torch" is plain PyTorch (reference.py, the specification), impl="ours" the kernel,
impl="auto" Triton on CUDA and the reference elsewhere. Gradients flow to x only (cos/sin tables
are treated as constants by the Triton path).
"""
from __future__ import annotations

import torch

from typing import Mapping, Optional

from csrc.rope.reference import (
    reference_apply_rope,
    reference_apply_rope_cos_sin,
    rope_cos_sin,
    rope_inv_freq,
    scale_inv_freq,
)
from csrc.triton_support import resolve_impl

__all__ = ["apply_rope", "apply_rope_cos_sin", "rope_cos_sin", "rope_inv_freq", "scale_inv_freq",
           "reference_apply_rope"]


def _check_x(x: torch.Tensor, rotary_dim: int, impl: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"RoPE: x must be [T, H, D], got {tuple(x.shape)}; apply it per q and k in THD layout")
    if rotary_dim % 2 or not 0 < rotary_dim <= x.shape[-1]:
        raise ValueError(f"RoPE: rotary_dim {rotary_dim} must be even and in (0, head_dim={x.shape[-1]}]")
    if impl == "ours" and x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"RoPE: the Triton kernel takes bf16/fp16/fp32, got {x.dtype}; use impl='torch'")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float, rotary_dim: int | None = None,
               impl: str = "auto", scaling: Optional[Mapping] = None) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head of x by its token's position.

    Args:
        x: [T, H, D] queries or keys; positions: int [T] position of each token in its document;
        base: RoPE theta (Llama-3: 500000; ProLong 64K: 8e6); rotary_dim: default D;
        scaling: None (plain RoPE) or Llama-3.1's frequency scaling (see reference.py).
    Returns: [T, H, D] in x's dtype (math in fp32).
    """
    resolved = resolve_impl(impl, x, "apply_rope")
    rotary_dim = rotary_dim or x.shape[-1]
    _check_x(x, rotary_dim, resolved)
    if positions.shape != (x.shape[0],) or positions.is_floating_point():
        raise ValueError(f"RoPE: positions must be an integer tensor [{x.shape[0]}], got {positions.dtype} {tuple(positions.shape)}")
    if resolved == "torch":
        return reference_apply_rope(x, positions, base, rotary_dim, scaling)
    from csrc.rope.triton_kernels import TritonRope

    x = x if x.stride(-1) == 1 else x.contiguous()
    inv_freq = rope_inv_freq(rotary_dim, base, x.device, scaling)
    return TritonRope.apply(x, rotary_dim // 2, None, None, positions.contiguous(), inv_freq)


def apply_rope_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rotate x [T, H, D] by precomputed per-token cos/sin [T, rotary_dim / 2] (any RoPE scaling)."""
    resolved = resolve_impl(impl, x, "apply_rope_cos_sin")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != x.shape[0]:
        raise ValueError(
            f"RoPE: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [T={x.shape[0]}, rotary_dim / 2]; "
            "Hugging Face's [T, rotary_dim] tables hold each value twice: pass cos[:, : rotary_dim // 2]"
        )
    _check_x(x, 2 * cos.shape[1], resolved)
    if resolved == "torch":
        return reference_apply_rope_cos_sin(x, cos, sin)
    from csrc.rope.triton_kernels import TritonRope

    x = x if x.stride(-1) == 1 else x.contiguous()
    return TritonRope.apply(x, cos.shape[1], cos.float().contiguous(), sin.float().contiguous(), None, None)
