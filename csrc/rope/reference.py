"""Plain-PyTorch rotary position embedding (non-interleaved, "rotate half", as Hugging Face Llama).

For each head, the first rotary_dim channels are split in halves x1 = x[:r/2], x2 = x[r/2:r] and
rotated pairwise by angle pos * inv_freq[i], inv_freq[i] = base^(-2i / r):
    out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin;   channels >= rotary_dim pass through.
Megatron's non-interleaved RoPE is the same, so Q/K need no permutation between the two.
"""
from __future__ import annotations

import torch


def rope_inv_freq(rotary_dim: int, base: float, device=None) -> torch.Tensor:
    """fp32 [rotary_dim / 2]: base^(-2i / rotary_dim), computed as Hugging Face computes it."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (base ** exponents)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [T, rotary_dim / 2] of angles positions[t] * inv_freq (fp32, like HF)."""
    angles = positions.float()[:, None] * rope_inv_freq(rotary_dim, base, positions.device)[None, :]
    return angles.cos(), angles.sin()


def reference_apply_rope_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by per-token cos/sin [T, r/2] (r = rotary_dim <= D), computed in fp32.

    Returns [T, H, D] in x's dtype (HF casts cos/sin to x's dtype first; this rounds once at the end).
    """
    half = cos.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1 = x[..., :half].to(acc)
    x2 = x[..., half : 2 * half].to(acc)
    c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def reference_apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate x [T, H, D] by the angles of positions [T] (int) with the given base."""
    cos, sin = rope_cos_sin(positions, rotary_dim or x.shape[-1], base)
    return reference_apply_rope_cos_sin(x, cos, sin)
