"""Triton RoPE, forward and backward in one kernel. Spec: csrc/rope/reference.py.

One program per token rotates all its heads. cos/sin come either from a precomputed [T, r/2]
table or, to save that table's memory traffic, from positions x inv_freq computed in the kernel
(the same fp32 product the reference forms; only cos/sin's last ulp may differ). Backward is the
rotation by -angle, i.e. the same kernel with sin negated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X, Y, Cos, Sin, Positions, InvFreq, stride_xt, stride_xh, stride_yt, stride_yh, n_heads, half, head_dim,
    FROM_POSITIONS: tl.constexpr, INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    freq = tl.arange(0, BLOCK_HALF)[None, :]
    freq_ok = freq < half
    ok = (heads < n_heads) & freq_ok
    if FROM_POSITIONS:
        angle = tl.load(Positions + token).to(tl.float32) * tl.load(InvFreq + freq, mask=freq_ok, other=0.0)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    else:
        cos = tl.load(Cos + token * half + freq, mask=freq_ok, other=0.0).to(tl.float32)
        sin = tl.load(Sin + token * half + freq, mask=freq_ok, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    x_row = X + token * stride_xt + heads * stride_xh
    y_row = Y + token * stride_yt + heads * stride_yh
    x1 = tl.load(x_row + freq, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + freq, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_row + freq, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=ok)
    tl.store(y_row + half + freq, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=ok)
    if BLOCK_PASS > 0:  # channels past rotary_dim are copied unchanged
        tail = 2 * half + tl.arange(0, BLOCK_PASS)[None, :]
        tail_ok = (heads < n_heads) & (tail < head_dim)
        tl.store(y_row + tail, tl.load(x_row + tail, mask=tail_ok, other=0.0), mask=tail_ok)


def _launch(x, half, cos, sin, positions, inv_freq, inverse):
    n_tokens, n_heads, head_dim = x.shape
    y = torch.empty_like(x)
    if n_tokens == 0:
        return y
    from_positions = positions is not None
    dummy = x  # unused pointer arguments of the other cos/sin source
    pass_dim = head_dim - 2 * half
    _rope_kernel[(n_tokens,)](
        x, y, cos if not from_positions else dummy, sin if not from_positions else dummy,
        positions if from_positions else dummy, inv_freq if from_positions else dummy,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), n_heads, half, head_dim,
        FROM_POSITIONS=from_positions, INVERSE=inverse, BLOCK_H=triton.next_power_of_2(n_heads),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_PASS=triton.next_power_of_2(pass_dim) if pass_dim else 0,
    )
    return y


@torch.library.custom_op("csrc::rope", mutates_args=())
def rope(x: torch.Tensor, half: int, cos: torch.Tensor | None, sin: torch.Tensor | None,
         positions: torch.Tensor | None, inv_freq: torch.Tensor | None, inverse: bool) -> torch.Tensor:
    """x [T, H, D] (unit last stride) rotated by +angle (or -angle when inverse)."""
    return _launch(x, half, cos, sin, positions, inv_freq, inverse)


@rope.register_fake
def _rope_fake(x, half, cos, sin, positions, inv_freq, inverse):
    return torch.empty_like(x)


def _rope_setup_context(ctx, inputs, output):
    _, ctx.half, cos, sin, positions, inv_freq, ctx.inverse = inputs
    ctx.save_for_backward(cos, sin, positions, inv_freq)


def _rope_backward(ctx, dy):
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    return rope(dy, ctx.half, *ctx.saved_tensors, not ctx.inverse), None, None, None, None, None, None


rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


class TritonRope:
    """Entry point: x [T, H, D] with unit last stride; either (cos, sin) or (positions, inv_freq)."""

    @staticmethod
    def apply(x, half, cos, sin, positions, inv_freq):
        return rope(x, half, cos, sin, positions, inv_freq, False)
