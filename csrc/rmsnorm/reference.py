"""Plain-PyTorch RMSNorm: the specification of the Triton kernel (and the CPU path)."""
from __future__ import annotations

import torch


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (fp64 for fp64), rounded once.

    x: [..., H]; weight: [H] (any float dtype, e.g. fp32 master weights with bf16 activations).
    Returns y in x's dtype. Hugging Face Llama rounds x_hat to x's dtype before the weight
    multiply; this rounds only the product, a difference within one bf16 ulp.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype)
