"""The MLP's activation as a megatron module: silu(gate) * up by csrc.swiglu."""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from csrc.swiglu import swiglu


class SwiGLU(MegatronModule):
    """silu(gate) * up on fc1's output [gate; up] (csrc.swiglu, ``impl`` "ours" or "torch").

    megatron's MLP hands a module activation the whole fc1 output only when
    ``config.use_te_activation_func`` is set (named after TE, but it is the spec slot for any
    activation module); the engine's TransformerConfig sets it exactly when swiglu is ours. A
    MegatronModule because the MLP asks every child for its (here empty) sharded_state_dict when
    checkpointing.
    """

    def __init__(self, config, impl: str = "ours"):
        super().__init__(config=config)
        self.impl = impl

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate_up, impl=self.impl)
