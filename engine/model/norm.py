"""RMSNorm as megatron-core's layer specs build it, with sequence-parallel support.

megatron-core's torch norm refuses sequence parallelism and its fused norm needs apex. Under
sequence parallelism each tensor-parallel rank normalizes its own slice of the sequence, so the
weight gradient on a rank is a partial sum; marking the weight ``sequence_parallel`` makes
megatron's ``finalize_model_grads`` all-reduce it over the tensor-parallel group.
"""
from __future__ import annotations

import torch

from csrc.rmsnorm import rms_norm


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, accumulated in fp32."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, impl: str = "torch"):
        super().__init__()
        self.eps = eps
        # csrc.rmsnorm impl: "ours" (Triton) or "torch" (the plain-PyTorch reference).
        self.impl = impl
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device="cpu"
                       if config.use_cpu_initialization else torch.cuda.current_device())
        )
        # Read by megatron's finalize_model_grads: sum the partial grads over TP ranks.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, impl=self.impl)
