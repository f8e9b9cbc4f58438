"""Plain-PyTorch SwiGLU on megatron's fused fc1 output: the specification of the Triton kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up where gate_up [..., 2F] = concat(gate, up) (megatron linear_fc1 layout).

    Computed in fp32 (fp64 for fp64), returned in gate_up's dtype as [..., F].
    """
    acc = torch.float64 if gate_up.dtype == torch.float64 else torch.float32
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
