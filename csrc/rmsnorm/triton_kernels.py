"""Triton RMSNorm forward/backward. Spec: csrc/rmsnorm/reference.py.

Forward: one program per row, the whole row in registers (H <= 16K), rstd kept for backward.
Backward: a fixed number of programs each walks a strided set of rows and keeps its partial
weight gradient in registers; the partials [programs, H] are summed by torch. That weight
gradient covers only the rows this rank holds: under sequence parallelism the caller (megatron,
for parameters marked sequence_parallel) all-reduces it over the tensor-parallel group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, Rstd, stride_x, stride_y, n_cols, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=ok)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, dY, dX, Rstd, dW_partial, stride_x, stride_dy, stride_dx, n_rows, n_cols, BLOCK_H: tl.constexpr,
):
    program = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    # rows program, program + n_programs, ...; counted by i so the row index is int64 everywhere
    for i in range(0, tl.cdiv(n_rows - program, n_programs)):
        row64 = program.to(tl.int64) + i * n_programs
        x = tl.load(X + row64 * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dY + row64 * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row64)
        x_hat = x * rstd
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat))
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / n_cols))
        tl.store(dX + row64 * stride_dx + cols, dx.to(dX.dtype.element_ty), mask=ok)
        dw += dy * x_hat
    tl.store(dW_partial + program * n_cols + cols, dw, mask=ok)


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


def _forward_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): the whole row in one program."""
    block_h = triton.next_power_of_2(n_cols)
    return block_h, min(max(block_h // 256, 1), 16)


@torch.library.custom_op("csrc::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, H] in x's dtype, rstd [N] fp32) of rows x [N, H] with unit last stride."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_h, warps = _forward_launch(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](x, weight, y, rstd, x.stride(0), y.stride(0), n_cols, eps,
                                    BLOCK_H=block_h, num_warps=warps)
    return y, rstd


@rms_norm_forward.register_fake
def _rms_norm_forward_fake(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("csrc::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, d weight in weight's dtype, this rank's rows only)."""
    dy = dy.contiguous()
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    programs = max(_backward_programs(n_rows, x.device), 1)
    dw_partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=x.device)
    if n_rows:
        block_h, warps = _forward_launch(n_cols)
        _rms_norm_bwd_kernel[(programs,)](x, weight, dy, dx, rstd, dw_partial, x.stride(0), dy.stride(0),
                                          dx.stride(0), n_rows, n_cols, BLOCK_H=block_h, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


@rms_norm_backward.register_fake
def _rms_norm_backward_fake(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _d_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_forward.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


def triton_rms_norm(rows: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y for validated rows [N, H] with unit last stride (csrc.rmsnorm.rms_norm reshapes)."""
    return rms_norm_forward(rows, weight, eps)[0]
