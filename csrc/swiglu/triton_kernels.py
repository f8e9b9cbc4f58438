"""Triton SwiGLU forward/backward. Spec: csrc/swiglu/reference.py.

Element-wise and memory bound: each program handles BLOCK columns of one row; backward
recomputes silu from the saved input rather than saving the activation (no extra memory).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(GateUp, Out, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(GateUp + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_in + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(Out + row * stride_out + cols, out.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(GateUp, dOut, dGateUp, stride_in, stride_dout, stride_din, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(GateUp + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_in + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    d_out = tl.load(dOut + row * stride_dout + cols, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    d_gate = d_out * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dGateUp + row * stride_din + cols, d_gate.to(dGateUp.dtype.element_ty), mask=ok)
    tl.store(dGateUp + row * stride_din + n_cols + cols, (d_out * silu).to(dGateUp.dtype.element_ty), mask=ok)


BLOCK = 1024


@torch.library.custom_op("csrc::swiglu_forward", mutates_args=())
def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of rows [N, 2F] with unit last stride; returns [N, F]."""
    n_rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if n_rows:
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), n_cols, BLOCK=BLOCK)
    return out


@swiglu_forward.register_fake
def _swiglu_forward_fake(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("csrc::swiglu_backward", mutates_args=())
def swiglu_backward(d_out: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d gate_up [N, 2F], recomputing silu from the saved input."""
    d_out = d_out.contiguous()
    n_rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = torch.empty_like(gate_up)
    if n_rows:
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            gate_up, d_out, d_gate_up, gate_up.stride(0), d_out.stride(0), d_gate_up.stride(0), n_cols, BLOCK=BLOCK)
    return d_gate_up


@swiglu_backward.register_fake
def _swiglu_backward_fake(d_out, gate_up):
    return torch.empty_like(gate_up)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, d_out):
    return swiglu_backward(d_out, ctx.saved_tensors[0])


swiglu_forward.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)
