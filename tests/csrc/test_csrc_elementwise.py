"""RMSNorm, RoPE, SwiGLU: references against fp64 formulas, Triton kernels against the references.

Each low-precision run is compared with fp64 on the same rounded inputs and cotangents, so only the
kernel's own rounding counts. Tolerances (inputs ~N(0, 1) x 3): fp32 1e-5 abs (5e-5 for the RMSNorm
weight gradient, a sum over rows); bf16 1.6e-2 abs + 1.6e-2 relative (the output rounding).
RoPE angles are fp32 like Hugging Face's (error ~ position x 6e-8 rad): 1e-4 abs in fp32 at
position 1000; Triton vs the reference at positions up to 512K: 2e-4 abs (last-ulp cos/sin
differences between torch and libdevice / numpy).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close

from csrc.rmsnorm import rms_norm
from csrc.rope import apply_rope, apply_rope_cos_sin, rope_cos_sin
from csrc.swiglu import swiglu

TOL = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1.6e-2, 1.6e-2)}


def grads_of(fn, inputs, seed=7, cotangent_dtype=None):
    """Output and the gradients of <output, random cotangent> with respect to inputs.

    The cotangent is rounded to cotangent_dtype first, so fp64 and low-precision runs see the same one."""
    out = fn(*inputs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cotangent = cotangent.to(cotangent_dtype or out.dtype).to(out.dtype)
    return (out, *torch.autograd.grad(out, inputs, cotangent))


def compare(fn_got, fn_expected, inputs, dtype, what, tol=None):
    """Run fn_got on inputs cast to dtype and fn_expected in fp64 on the same (rounded) values.

    Only the kernel's own rounding is measured, not the quantization of its inputs."""
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    high = [t.detach().double().requires_grad_() for t in low]
    atol, rtol = tol or TOL[dtype]
    pairs = zip(grads_of(fn_got, low, cotangent_dtype=dtype), grads_of(fn_expected, high, cotangent_dtype=dtype))
    for i, (a, b) in enumerate(pairs):
        assert_close(a, b, atol, rtol, f"{what} {dtype} {'output' if i == 0 else f'grad {i - 1}'}")


def rms_norm_fp64(x, w, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 96), (1, 130), (33, 64)])
def test_rms_norm(impl, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    compare(lambda x, w: rms_norm(x, w, 1e-5, impl=impl), rms_norm_fp64, [x, w], dtype, f"rms_norm {impl}",
            tol=(5e-5, 1e-5) if dtype == torch.float32 else None)  # the weight grad sums 231 rows


def test_rms_norm_rejects_a_weight_of_another_size():
    with pytest.raises(ValueError, match="weight \\(8,\\) must be \\[H\\]"):
        rms_norm(torch.randn(5, 16), torch.ones(8))


def rope_fp64(x, positions, base, rotary_dim):
    """Rotate each channel pair (i, i + r/2) by positions * base^(-2i/r), in fp64, elementwise."""
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = positions.double()[:, None, None] * inv_freq[None, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * torch.cos(angle) - x2 * torch.sin(angle), x2 * torch.cos(angle) + x1 * torch.sin(angle), rest], -1)


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim,rotary_dim", [(3, 64, 64), (2, 128, 96), (5, 16, 8)])
def test_rope_from_positions(impl, dtype, heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 1, 2, 0, 5, 1000, 0, 77])  # packed documents restart at 0
    x = torch.randn(len(positions), heads, head_dim, generator=gen, dtype=torch.float64)
    compare(lambda x: apply_rope(x, positions, 10000.0, rotary_dim, impl=impl),
            lambda x: rope_fp64(x, positions, 10000.0, rotary_dim), [x], dtype, f"rope {impl}",
            tol=(1e-4, 0) if dtype == torch.float32 else None)  # fp32 angles at position 1000: ~6e-5 rad


def test_rope_large_positions_and_base():
    """ProLong's base 8e6 at positions up to 512K: Triton matches the fp32 reference."""
    positions = torch.tensor([0, 65535, 131071, 524287])
    x = torch.randn(4, 2, 128, dtype=torch.float32)
    ref = apply_rope(x, positions, 8e6, impl="torch")
    assert_close(apply_rope(x, positions, 8e6, impl="ours"), ref, 2e-4, 0, "rope 512K")
    # fp32 angles lose ~|angle| * 6e-8 rad; that is the HF convention the reference follows
    assert_close(ref, rope_fp64(x.double(), positions, 8e6, 128), 0.1, 0, "rope 512K vs fp64")


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_rope_cos_sin_matches_positions_version(impl):
    positions = torch.tensor([3, 0, 1, 2, 9])
    x = torch.randn(5, 4, 64, requires_grad=True)
    cos, sin = rope_cos_sin(positions, 32, 500000.0)
    got = grads_of(lambda x: apply_rope_cos_sin(x, cos, sin, impl=impl), [x])
    expected = grads_of(lambda x: apply_rope(x, positions, 500000.0, rotary_dim=32, impl="torch"), [x])
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-5, 0, f"rope cos/sin {impl}")
    with pytest.raises(ValueError, match="Hugging Face's"):
        apply_rope_cos_sin(x, torch.cat([cos, cos], 1), sin, impl=impl)


def test_rope_matches_hugging_face_llama():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.tensor([0, 4, 9, 100])
    q = torch.randn(4, 2, 64)
    cos, sin = rope_cos_sin(positions, 64, 500000.0)
    hf_cos, hf_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    # HF layout: [batch, heads, seq, dim]
    hf_q, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], hf_cos[None], hf_sin[None])
    assert_close(apply_rope(q, positions, 500000.0, impl="torch"), hf_q[0].transpose(0, 1), 1e-6, 0, "vs HF")


def swiglu_fp64(gate_up):
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 22), (1, 2), (9, 2 * 1100)])
def test_swiglu(impl, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    compare(lambda x: swiglu(x, impl=impl), swiglu_fp64, [x], dtype, f"swiglu {impl}")


def test_swiglu_layout_is_gate_then_up():
    gate_up = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    expected = torch.tensor([[F.silu(torch.tensor(1.0)) * 10, F.silu(torch.tensor(2.0)) * 20]])
    for impl in ("torch", "ours"):
        assert_close(swiglu(gate_up, impl=impl), expected, 1e-6, 0, impl)
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.zeros(2, 3))


def test_elementwise_check_can_fail():
    x = torch.randn(4, 8)
    with pytest.raises(AssertionError):
        assert_close(swiglu(x, impl="ours"), swiglu_fp64(x.flip(-1).double()), 1e-5, 0, "flipped")
