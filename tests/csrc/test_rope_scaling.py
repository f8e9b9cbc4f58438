"""Llama-3.1's llama3 RoPE scaling in csrc.rope: the frequencies are transformers' own, and the
Triton kernel and the reference rotate by them."""
from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from csrc.rope import apply_rope, apply_rope_cos_sin, rope_inv_freq

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
TINY = {**LLAMA31, "factor": 32.0, "original_max_position_embeddings": 32}


def transformers_inv_freq(head_dim: int, base: float, scaling: dict) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                         rope_parameters={**scaling, "rope_theta": base})
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


@pytest.mark.parametrize("head_dim, base, scaling", [(128, 500_000.0, LLAMA31),
                                                      (16, 1e4, TINY), (64, 1e4, TINY)])
def test_inv_freq_is_transformers_llama3(head_dim, base, scaling):
    pytest.importorskip("transformers")
    expected = transformers_inv_freq(head_dim, base, scaling)
    got = rope_inv_freq(head_dim, base, scaling=scaling)
    assert torch.equal(got, expected)
    plain = rope_inv_freq(head_dim, base)
    # Every branch is exercised: kept, divided by the factor, and interpolated between.
    ratio = plain / got
    assert (ratio == 1).any() and (ratio == scaling["factor"]).any()
    assert ((ratio > 1) & (ratio < scaling["factor"])).any()


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_scaled_rope_rotates_by_the_scaled_frequencies(impl):
    positions = torch.tensor([0, 7, 31, 32, 100, 1000, 4095, 3])
    x = torch.randn(len(positions), 3, 16, requires_grad=True)
    inv_freq = rope_inv_freq(16, 500_000.0, scaling=TINY)
    angles = positions.float()[:, None] * inv_freq[None, :]
    expected = apply_rope_cos_sin(x, angles.cos(), angles.sin(), impl="torch")
    got = apply_rope(x, positions, 500_000.0, impl=impl, scaling=TINY)
    assert_close(got, expected, 1e-5, 0, f"llama3 rope {impl}")
    plain = apply_rope(x, positions, 500_000.0, impl="torch")
    assert (plain - expected).abs().max() > 1e-2  # the scaling changes the result


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="'yarn' is not implemented"):
        rope_inv_freq(16, 1e4, scaling={"rope_type": "yarn", "factor": 4.0})
