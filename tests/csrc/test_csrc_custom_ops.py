"""The Triton kernels as torch custom ops: shapes and dtypes on the meta device at Llama-3-8B scale
(what a dry run computes on), under FakeTensorMode and torch.compile, and fake implementations
that agree with the real kernels (torch.library.opcheck, through the CPU interpreter).

Llama-3-8B: head dim 128, 32 query / 8 KV heads, hidden 4096, FFN 14336, vocabulary 128,256; 64K
tokens in mixed documents. On meta nothing is computed, so these run in well under a second.
"""
import pytest
import torch

from csrc.attention import varlen_attention
from csrc.linear_cross_entropy import fused_linear_cross_entropy, linear_token_scores
from csrc.rmsnorm import rms_norm
from csrc.rope import apply_rope, apply_rope_cos_sin
from csrc.swiglu import swiglu

pytest.importorskip("triton")

TOKENS, HEAD_DIM, HEADS_Q, HEADS_KV, HIDDEN, FFN, VOCAB = 65536, 128, 32, 8, 4096, 14336, 128256
META = torch.device("meta")
BF16 = torch.bfloat16


def meta(*shape, dtype=BF16, grad=True):
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)


def assert_like(tensor, shape, dtype, what):
    assert tensor.device.type == "meta", f"{what}: computed off the meta device ({tensor.device})"
    assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, (
        f"{what}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}")


def made_by(tensor, op_name: str) -> bool:
    """Whether the custom op csrc::op_name is on the autograd path from tensor (views skipped)."""
    node = tensor.grad_fn
    while node is not None:
        if f"csrc_{op_name}" in type(node).__name__:
            return True
        node = node.next_functions[0][0] if node.next_functions else None
    return False


def cu_seqlens(device=META):
    # a ProLong-like mix; the values are never read on meta, only the shape [n_docs + 1]
    return torch.empty(5, dtype=torch.int32, device=device)


@pytest.mark.parametrize("tp", [1, 4])
def test_attention_on_meta(tp):
    q = meta(TOKENS, HEADS_Q // tp, HEAD_DIM)
    k, v = meta(TOKENS, HEADS_KV // tp, HEAD_DIM), meta(TOKENS, HEADS_KV // tp, HEAD_DIM)
    out, lse = varlen_attention(q, k, v, cu_seqlens(), cu_seqlens(), TOKENS, TOKENS, impl="ours")
    assert_like(out, q.shape, BF16, "attention out")
    assert_like(lse, (HEADS_Q // tp, TOKENS), torch.float32, "attention lse")
    assert made_by(out, "varlen_attention_forward"), out.grad_fn
    (out.float().sum() + lse.sum()).backward()
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        assert_like(t.grad, t.shape, BF16, name)


def test_auto_means_ours_on_meta():
    """A dry run's meta device stands for the GPU: "auto" takes the custom op, not the reference."""
    from csrc.triton_support import ours_by_default, resolve_impl

    assert ours_by_default("meta") and resolve_impl("auto", meta(1, grad=False), "test") == "ours"
    x = meta(TOKENS, HIDDEN)
    assert made_by(rms_norm(x, meta(HIDDEN)), "rms_norm_forward")


@pytest.mark.parametrize("tp", [1, 4])
def test_linear_cross_entropy_on_meta(tp):
    hidden, weight = meta(TOKENS, HIDDEN), meta(VOCAB // tp, HIDDEN)
    labels = torch.empty(TOKENS, dtype=torch.int64, device=META)
    loss_sum, n_valid = fused_linear_cross_entropy(hidden, weight, labels, impl="ours")
    assert_like(loss_sum, (), torch.float32, "loss_sum")
    assert_like(n_valid, (), torch.int64, "n_valid")
    loss_sum.backward()
    assert_like(hidden.grad, hidden.shape, BF16, "d hidden")
    assert_like(weight.grad, weight.shape, BF16, "d weight")
    with torch.no_grad():  # evaluation
        token_loss, argmax = linear_token_scores(hidden, weight, labels)
    assert_like(token_loss, (TOKENS,), torch.float32, "token loss")
    assert_like(argmax, (TOKENS,), torch.int64, "argmax")


@pytest.mark.parametrize("tp", [1, 4])
def test_elementwise_on_meta(tp):
    x = meta(TOKENS, HIDDEN)
    weight = meta(HIDDEN)
    y = rms_norm(x, weight, impl="ours")
    assert_like(y, x.shape, BF16, "rms_norm")
    gate_up = meta(TOKENS, 2 * FFN // tp)
    act = swiglu(gate_up, impl="ours")
    assert_like(act, (TOKENS, FFN // tp), BF16, "swiglu")
    q = meta(TOKENS, HEADS_Q // tp, HEAD_DIM)
    positions = torch.empty(TOKENS, dtype=torch.int64, device=META)
    rotated = apply_rope(q, positions, 500000.0, impl="ours")
    assert_like(rotated, q.shape, BF16, "rope")
    cos = torch.empty(TOKENS, HEAD_DIM // 2, device=META)
    rotated_k = apply_rope_cos_sin(q, cos, cos, impl="ours")
    (y.float().sum() + act.float().sum() + rotated.float().sum() + rotated_k.float().sum()).backward()
    assert_like(x.grad, x.shape, BF16, "d x")
    assert_like(weight.grad, weight.shape, BF16, "d rms weight")
    assert_like(gate_up.grad, gate_up.shape, BF16, "d gate_up")
    assert_like(q.grad, q.shape, BF16, "d q")


def test_fake_tensor_mode():
    """FakeTensorMode (a memory tracker's tensors) on the device a GPU run uses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(TOKENS, HEADS_Q, HEAD_DIM, dtype=BF16, requires_grad=True)
        k = torch.empty(TOKENS, HEADS_KV, HEAD_DIM, dtype=BF16, requires_grad=True)
        cu = torch.empty(5, dtype=torch.int32)
        out, lse = varlen_attention(q, k, k, cu, cu, TOKENS, TOKENS, impl="ours")
        assert out.shape == q.shape and lse.shape == (HEADS_Q, TOKENS)
        hidden, weight = torch.empty(TOKENS, HIDDEN, dtype=BF16), torch.empty(VOCAB, HIDDEN, dtype=BF16)
        loss_sum, _ = fused_linear_cross_entropy(hidden, weight.requires_grad_(),
                                                 torch.empty(TOKENS, dtype=torch.int64), impl="ours")
        loss_sum.backward()
        assert weight.grad.shape == weight.shape and weight.grad.dtype == BF16


def _small_attention_args(device, requires_grad):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(40, 4, 64, generator=gen).to(device).requires_grad_(requires_grad)
    k = torch.randn(40, 2, 64, generator=gen).to(device).requires_grad_(requires_grad)
    v = torch.randn(40, 2, 64, generator=gen).to(device).requires_grad_(requires_grad)
    cu = torch.tensor([0, 7, 30, 40], dtype=torch.int32, device=device)
    return q, k, v, cu


def test_fake_implementations_match_the_kernels(device):
    """opcheck runs each op for real (the interpreter on CPU) and checks its fake implementation,
    schema and autograd registration against it."""
    from csrc.attention.triton_kernels import TILE_KEYS, default_blocks, varlen_attention_forward
    from csrc.linear_cross_entropy.triton_kernels import linear_cross_entropy_forward
    from csrc.rmsnorm.triton_kernels import rms_norm_forward
    from csrc.rope.triton_kernels import rope
    from csrc.swiglu.triton_kernels import swiglu_forward
    from csrc.triton_support import triton_interpreting

    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    q, k, v, cu = _small_attention_args(device, True)
    blocks = default_blocks(64, torch.float32, triton_interpreting())
    tiles = [blocks[key] for key in TILE_KEYS]
    torch.library.opcheck(varlen_attention_forward, (q, k, v, cu, cu, 0.125, True, tiles), test_utils=checks)
    labels = torch.tensor([3, -1, 0, 5, 7, 1], device=device)
    counted = labels >= 0
    torch.library.opcheck(linear_cross_entropy_forward, (rand(6, 16), rand(9, 16), labels, counted, None, 4, True, True),
                          test_utils=checks)
    torch.library.opcheck(rms_norm_forward, (rand(5, 24), rand(24), 1e-5), test_utils=checks)
    torch.library.opcheck(swiglu_forward, (rand(5, 24),), test_utils=checks)
    positions = torch.arange(6, device=device)
    inv_freq = torch.rand(8, generator=gen).to(device)
    torch.library.opcheck(rope, (rand(6, 3, 16), 8, None, None, positions, inv_freq, False), test_utils=checks)


def test_torch_compile_traces_the_ops(device):
    """torch.compile (AOT autograd, no code generation) traces forward and backward through the
    ops' fake implementations in one graph, and the compiled gradients equal eager ones."""
    import torch._dynamo

    q, k, v, cu = _small_attention_args(device, True)

    def block(q, k, v):
        out, _ = varlen_attention(q, k, v, cu, cu, 23, 23, impl="ours")
        return swiglu(rms_norm(out.reshape(40, -1), torch.ones(256, device=device), impl="ours"), impl="ours")

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=False)
    got = compiled(q, k, v)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    expected = block(q, k, v)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
