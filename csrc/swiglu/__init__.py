"""SwiGLU activation on megatron's fused fc1 output [gate; up].

impl="torch" is plain PyTorch (reference.py, the specification), impl="ours" the kernel,
impl="auto" Triton on CUDA and the reference elsewhere.
"""
from __future__ import annotations

import torch

from csrc.swiglu.reference import reference_swiglu
from csrc.triton_support import resolve_impl

__all__ = ["swiglu", "reference_swiglu"]


def swiglu(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2F] = concat(gate, up); returns [..., F] in the input dtype."""
    resolved = resolve_impl(impl, gate_up, "swiglu")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim of gate_up {tuple(gate_up.shape)} must be even (concat of gate and up)")
    if resolved == "torch":
        return reference_swiglu(gate_up)
    if gate_up.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"swiglu: the Triton kernel takes bf16/fp16/fp32, got {gate_up.dtype}; use impl='torch'")
    from csrc.swiglu.triton_kernels import swiglu_forward

    rows = gate_up.reshape(-1, gate_up.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    return swiglu_forward(rows).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
