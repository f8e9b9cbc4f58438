"""Plain-PyTorch rotary position embedding (non-interleaved, "rotate half", as Hugging Face Llama).

For each head, the first rotary_dim channels are split in halves x1 = x[:r/2], x2 = x[r/2:r] and
rotated pairwise by angle pos * inv_freq[i], inv_freq[i] = base^(-2i / r):
    out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin;   channels >= rotary_dim pass through.
Megatron's non-interleaved RoPE is the same, so Q/K need no permutation between the two.

``scaling`` (optional) is Llama-3.1's frequency-dependent scaling, a mapping with rope_type
"llama3", factor, low_freq_factor, high_freq_factor and original_max_position_embeddings, as in a
Hugging Face config.json's rope_scaling: with L = original_max_position_embeddings, a frequency
of wavelength w = 2 pi / inv_freq is kept if w < L / high_freq_factor, divided by factor if
w > L / low_freq_factor, and in between mixed as (1 - s) inv_freq / factor + s inv_freq with
s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch


def scale_inv_freq(inv_freq: torch.Tensor, scaling: Optional[Mapping]) -> torch.Tensor:
    """``inv_freq`` after ``scaling`` (None: unchanged), in inv_freq's dtype."""
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"RoPE: scaling type {kind!r} is not implemented (only 'llama3')")
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    long_waves = wavelength > original / low
    short_waves = wavelength < original / high
    smooth = (original / wavelength - low) / (high - low)
    mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(short_waves, inv_freq, torch.where(long_waves, inv_freq / factor, mixed))


def rope_inv_freq(rotary_dim: int, base: float, device=None, scaling: Optional[Mapping] = None) -> torch.Tensor:
    """fp32 [rotary_dim / 2]: base^(-2i / rotary_dim), then ``scaling``, computed as Hugging Face
    computes them."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return scale_inv_freq(1.0 / (base ** exponents), scaling)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float,
                 scaling: Optional[Mapping] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [T, rotary_dim / 2] of angles positions[t] * inv_freq (fp32, like HF)."""
    inv_freq = rope_inv_freq(rotary_dim, base, positions.device, scaling)
    angles = positions.float()[:, None] * inv_freq[None, :]
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


def reference_apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float, rotary_dim: int | None = None,
                         scaling: Optional[Mapping] = None) -> torch.Tensor:
    """Rotate x [T, H, D] by the angles of positions [T] (int) with the given base and scaling."""
    cos, sin = rope_cos_sin(positions, rotary_dim or x.shape[-1], base, scaling)
    return reference_apply_rope_cos_sin(x, cos, sin)
