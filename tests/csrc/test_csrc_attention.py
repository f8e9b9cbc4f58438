"""varlen_attention: the reference against a dense fp64 oracle, the Triton kernel against the reference.

Tolerances (max abs error; inputs ~N(0, 1), outputs O(1)):
- fp32: 2e-5 (out, lse), 1e-4 (gradients).
- bf16/fp16 reference vs fp64 oracle: 2e-2 / 5e-3 on out (one rounding of the output), 5e-2 / 1e-2
  on gradients (the bf16 gradient is rounded once more from fp32).
- bf16/fp16 Triton vs fp64 oracle: the same, since both accumulate in fp32. Under the CPU interpreter
  bf16 tiles are multiplied in fp32 (bf16 tl.dot is broken there); fp16 uses fp16 tl.dot.
"""
import math

import pytest
import torch
from kernel_testing import assert_close

from csrc.attention import merge_attention_outputs, reference_varlen_attention, varlen_attention

TOL = {
    torch.float32: dict(out=2e-5, grad=1e-4),
    torch.bfloat16: dict(out=2e-2, grad=5e-2),
    torch.float16: dict(out=5e-3, grad=1e-2),
}


def cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_inputs(len_q, len_k, heads_q, heads_kv, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(len_q), heads_q, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(len_k), heads_kv, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(len_k), heads_kv, head_dim, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def dense_oracle(q, k, v, len_q, len_k, causal):
    """Per document, the textbook softmax(QK^T / sqrt(D) + mask) V in fp64 with an explicit mask.

    Differentiable when given fp64 leaves; lower-precision inputs are detached and upcast."""
    if q.dtype != torch.float64:
        q, k, v = (t.detach().double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(len_q, len_k):
        qd = q[q0 : q0 + lq].transpose(0, 1)  # [H, lq, D]
        kd = k[k0 : k0 + lk].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[k0 : k0 + lk].repeat_interleave(group, dim=1).transpose(0, 1)
        s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            i = torch.arange(lq)[:, None]
            j = torch.arange(lk)[None, :]
            s = s.masked_fill(j > i + lk - lq, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append((p @ vd).transpose(0, 1))
        lses.append(lse)
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, dim=1)


def forward_backward(q, k, v, len_q, len_k, causal, impl, seed=1, **kwargs):
    """out, lse and the gradients of a loss that uses both out and lse (as merging does)."""
    device = q.device
    out, lse = varlen_attention(q, k, v, cu(len_q, device), cu(len_k, device), max(len_q), max(len_k),
                                causal=causal, impl=impl, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=gen).to(device)
    d_lse = torch.randn(lse.shape, generator=gen).to(device)
    loss = (out.float() * d_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out, lse, *grads)


NAMES = ("out", "lse", "dq", "dk", "dv")

# (query lengths, key lengths, Hq, Hkv): odd lengths, length-1 documents, several documents,
# GQA ratios 1/2/4, lq < lk (context-parallel chunks) and lq > lk (rows that see no key).
CASES = [
    ([37, 1, 20], [37, 1, 20], 4, 2),
    ([1], [1], 2, 2),
    ([10, 5, 33], [40, 5, 70], 4, 1),
    ([30, 5, 2], [10, 5, 0], 4, 4),
    ([17, 16, 1, 3], [17, 16, 1, 3], 8, 2),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("len_q,len_k,heads_q,heads_kv", CASES)
def test_reference_matches_dense_oracle_fp32(len_q, len_k, heads_q, heads_kv, causal):
    q, k, v = make_inputs(len_q, len_k, heads_q, heads_kv, 16, torch.float32, "cpu")
    expected = dense_oracle(q, k, v, len_q, len_k, causal)
    out, lse = reference_varlen_attention(q, k, v, cu(len_q, "cpu"), cu(len_k, "cpu"), causal=causal, query_block=7)
    assert_close(out, expected[0], 2e-5, 0, "out")
    assert_close(lse, expected[1], 2e-5, 0, "lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_against_fp64(dtype):
    len_q, len_k = [37, 1, 20, 9], [37, 1, 25, 5]
    q64, k64, v64 = make_inputs(len_q, len_k, 4, 2, 64, torch.float64, "cpu")
    expected = forward_backward(q64, k64, v64, len_q, len_k, True, "torch")
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    got = forward_backward(q, k, v, len_q, len_k, True, "torch")
    for name, a, b in zip(NAMES, got, expected):
        tol = TOL[dtype]["out" if name in ("out", "lse") else "grad"]
        assert_close(a, b, tol, tol, f"{dtype} {name}")


def test_reference_gradients_match_dense_oracle_fp64():
    len_q, len_k = [9, 1, 12], [13, 1, 12]
    q, k, v = make_inputs(len_q, len_k, 4, 2, 8, torch.float64, "cpu")
    got_out, _ = reference_varlen_attention(q, k, v, cu(len_q, "cpu"), cu(len_k, "cpu"), query_block=4)
    got = torch.autograd.grad(got_out.sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(dense_oracle(q2, k2, v2, len_q, len_k, True)[0].sum(), (q2, k2, v2))
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        assert_close(a, b, 1e-10, 0, name)


def test_reference_block_size_and_recompute_do_not_change_result():
    len_q = [50, 3, 31]
    q, k, v = make_inputs(len_q, len_q, 4, 2, 16, torch.float64, "cpu")
    base = reference_varlen_attention(q, k, v, cu(len_q, "cpu"), cu(len_q, "cpu"), query_block=1)
    base_grads = torch.autograd.grad(base[0].sum(), (q, k, v))
    for block, recompute in ((5, True), (16, False), (1024, True)):
        other = reference_varlen_attention(q, k, v, cu(len_q, "cpu"), cu(len_q, "cpu"), query_block=block, recompute=recompute)
        assert_close(other[0], base[0], 1e-12, 0, f"out block {block}")
        assert_close(other[1], base[1], 1e-12, 0, f"lse block {block}")
        for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(other[0].sum(), (q, k, v)), base_grads):
            assert_close(a, b, 1e-12, 0, f"{name} block {block} recompute {recompute}")


def test_rows_that_see_no_key_are_zero_with_finite_gradients():
    len_q, len_k = [6, 4], [2, 0]  # doc 0: the first 4 rows see nothing; doc 1: no key at all
    q, k, v = make_inputs(len_q, len_k, 2, 1, 8, torch.float32, "cpu")
    out, lse, dq, dk, dv = forward_backward(q, k, v, len_q, len_k, True, "torch")
    assert torch.all(out[:4] == 0) and torch.all(out[6:] == 0)
    assert torch.all(lse[:, :4] == -math.inf) and torch.all(lse[:, 6:] == -math.inf)
    assert torch.isfinite(lse[:, 4:6]).all()
    assert torch.all(dq[:4] == 0) and torch.all(dq[6:] == 0)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("len_q,len_k,heads_q,heads_kv", CASES)
def test_triton_matches_reference_fp32(len_q, len_k, heads_q, heads_kv, causal, device):
    q, k, v = make_inputs(len_q, len_k, heads_q, heads_kv, 64, torch.float32, device)
    expected = forward_backward(q, k, v, len_q, len_k, causal, "torch")
    got = forward_backward(q, k, v, len_q, len_k, causal, "ours")
    for name, a, b in zip(NAMES, got, expected):
        tol = TOL[torch.float32]["out" if name in ("out", "lse") else "grad"]
        assert_close(a, b, tol, 0, name)


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 128)])
def test_triton_low_precision_against_fp64(dtype, head_dim, device):
    len_q, len_k = [37, 1, 20], [45, 1, 20]
    q64, k64, v64 = make_inputs(len_q, len_k, 4, 2, head_dim, torch.float64, device)
    expected = forward_backward(q64, k64, v64, len_q, len_k, True, "torch")
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    got = forward_backward(q, k, v, len_q, len_k, True, "ours")
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, b in zip(NAMES, got, expected):
        tol = TOL[dtype]["out" if name in ("out", "lse") else "grad"]
        assert_close(a, b, tol, tol, f"{dtype} {name}")


def test_triton_other_tile_sizes(device):
    """Unequal forward/backward tiles exercise the block table and the masked/unmasked split."""
    from csrc.attention.triton_kernels import triton_varlen_attention

    len_q, len_k = [40, 7, 33], [40, 20, 33]
    q, k, v = make_inputs(len_q, len_k, 4, 2, 64, torch.float32, device)
    blocks = dict(fwd_m=32, fwd_n=16, dq_m=16, dq_n=32, dkdv_m=32, dkdv_n=16, warps_fwd=4, warps_bwd=4, stages=1)
    out, lse = triton_varlen_attention(q, k, v, cu(len_q, device), cu(len_k, device), 0.125, True, blocks)
    expected = dense_oracle(q, k, v, len_q, len_k, True)
    assert_close(out, expected[0], 2e-5, 0, "out")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_out, _ = reference_varlen_attention(q, k, v, cu(len_q, device), cu(len_k, device))
    ref_grads = torch.autograd.grad(ref_out.sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, 1e-4, 0, name)


def test_kernel_check_can_fail(device):
    """The comparison is sensitive: a wrong softmax scale is caught."""
    len_q = [20, 9]
    q, k, v = make_inputs(len_q, len_q, 2, 2, 64, torch.float32, device)
    out, _ = varlen_attention(q, k, v, cu(len_q, device), cu(len_q, device), 20, 20, softmax_scale=0.13, impl="ours")
    expected = dense_oracle(q, k, v, len_q, len_q, True)[0]
    with pytest.raises(AssertionError):
        assert_close(out, expected, 2e-5, 0, "out")


def split_keys(q, k, v, len_q, len_k, cut):
    """Non-causal attention of each document against keys [0, cut_d) and [cut_d, lk)."""
    first, second = [], []
    k0 = 0
    for lk, c in zip(len_k, cut):
        first.append(torch.arange(k0, k0 + c))
        second.append(torch.arange(k0 + c, k0 + lk))
        k0 += lk
    parts = []
    for index, lengths in ((torch.cat(first), cut), (torch.cat(second), [lk - c for lk, c in zip(len_k, cut)])):
        parts.append(reference_varlen_attention(q, k[index], v[index], cu(len_q, "cpu"), cu(lengths, "cpu"), causal=False))
    return parts


def test_merge_attention_outputs_equals_attention_over_all_keys():
    len_q, len_k, cut = [5, 3, 4], [9, 4, 0], [4, 0, 0]  # doc 1: one empty part; doc 2: no keys anywhere
    q, k, v = make_inputs(len_q, len_k, 4, 2, 8, torch.float64, "cpu")
    (out_a, lse_a), (out_b, lse_b) = split_keys(q, k, v, len_q, len_k, cut)
    merged_out, merged_lse = merge_attention_outputs([out_a, out_b], [lse_a, lse_b])
    full_out, full_lse = reference_varlen_attention(q, k, v, cu(len_q, "cpu"), cu(len_k, "cpu"), causal=False)
    assert_close(merged_out, full_out, 1e-12, 0, "merged out")
    assert_close(merged_lse, full_lse, 1e-12, 0, "merged lse")
    assert torch.all(merged_out[8:] == 0)

    weights = torch.randn(full_out.shape, dtype=torch.float64)
    lse_weights = torch.randn(full_lse.shape, dtype=torch.float64)

    def loss(out, lse):
        return (out * weights).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * lse_weights).sum()

    merged_grads = torch.autograd.grad(loss(merged_out, merged_lse), (q, k, v))
    full_grads = torch.autograd.grad(loss(full_out, full_lse), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), merged_grads, full_grads):
        assert_close(a, b, 1e-10, 0, name)


def test_merge_rejects_mismatched_inputs():
    out = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="one lse per output"):
        merge_attention_outputs([out, out], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"expected out \[T, H, D\] and lse \[H, T\]"):
        merge_attention_outputs([out], [torch.zeros(3, 2)])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(head_dim=96), "head_dim 96 is not supported"),
        (dict(dtype=torch.float64), "dtype torch.float64 is not supported by impl='ours'"),
        (dict(cu_q=[0, 5, 3, 10]), "cu_seqlens_q decreases at document 1"),
        (dict(cu_q=[0, 5, 9]), "must start at 0 and end at the token count 10"),
        (dict(cu_q_dtype=torch.int64), "must be an int32 tensor"),
        (dict(max_q=4), "max_seqlen_q = 4 is smaller than the longest document"),
        (dict(heads_kv=4), "must be a multiple of KV heads 4"),
    ],
)
def test_bad_input_is_rejected_before_launch(change, message):
    head_dim = change.get("head_dim", 64)
    q = torch.zeros(10, 6, head_dim, dtype=change.get("dtype", torch.float32))
    k = torch.zeros(10, change.get("heads_kv", 2), head_dim, dtype=q.dtype)
    cu_q = torch.tensor(change.get("cu_q", [0, 5, 10]), dtype=change.get("cu_q_dtype", torch.int32))
    cu_k = torch.tensor([0, 5, 10] if cu_q.numel() == 3 else [0, 2, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, k, cu_q, cu_k, change.get("max_q", 10), 10, impl="ours")


def test_cu_seqlens_are_checked_again_after_an_in_place_change():
    """Validation is cached per cu_seqlens tensor (one host sync per micro-batch, not per layer),
    but an in-place edit bumps the tensor's version and is caught."""
    q = torch.zeros(10, 2, 16)
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32)
    cu_k = cu_q.clone()
    varlen_attention(q, q, q, cu_q, cu_k, 5, 5, impl="torch")
    varlen_attention(q, q, q, cu_q, cu_k, 5, 5, impl="torch")  # cached: no error, same answer
    cu_q[1] = 11
    with pytest.raises(ValueError, match="cu_seqlens_q decreases at document 1"):
        varlen_attention(q, q, q, cu_q, cu_k, 5, 5, impl="torch")


@pytest.mark.parametrize("use", ["out", "lse"])
def test_triton_backward_from_one_output_only(use, device):
    len_q = [21, 6]
    q, k, v = make_inputs(len_q, len_q, 2, 1, 64, torch.float32, device)
    grads = {}
    for impl in ("torch", "ours"):
        out, lse = varlen_attention(q, k, v, cu(len_q, device), cu(len_q, device), 21, 21, impl=impl)
        got = torch.autograd.grad((out if use == "out" else lse).sum(), (q, k, v), allow_unused=True)
        grads[impl] = [torch.zeros_like(t) if g is None else g for g, t in zip(got, (q, k, v))]  # lse ignores v
    for name, a, b in zip(("dq", "dk", "dv"), grads["ours"], grads["torch"]):
        assert_close(a, b, 1e-4, 0, f"{name} from {use}")


def test_block_table_launches_the_heaviest_blocks_first():
    """Causal work grows along a document for query blocks and shrinks for key blocks: the forward
    and dQ tables start with the last blocks of the longest documents, dK/dV with the first ones.
    Every (document, block) appears once; spare programs come last."""
    from csrc.attention.triton_kernels import _block_table

    lengths = [300, 700, 0, 50]
    cu_seqlens = cu(lengths, torch.device("cpu"))
    expected_blocks = {(d, r) for d, n in enumerate(lengths) for r in range(0, n, 128)}
    for heavy_end in ("last", "first"):
        block_doc, block_row, n_programs = _block_table(cu_seqlens, sum(lengths), 128, heavy_end)
        pairs = list(zip(block_doc.tolist(), block_row.tolist()))
        real = [p for p in pairs if p[0] >= 0]
        assert len(pairs) == n_programs and set(real) == expected_blocks and len(real) == len(expected_blocks)
        assert pairs[: len(real)] == real, f"{heavy_end}: spare programs must come last: {pairs}"
        work = [min(r + 128, lengths[d]) if heavy_end == "last" else lengths[d] - r for d, r in real]
        assert work == sorted(work, reverse=True), f"{heavy_end}: not heaviest first: {pairs}"
    assert _block_table(cu_seqlens, sum(lengths), 128, "first")[1][:3].tolist() == [0, 128, 256]  # doc 1's first blocks
    assert _block_table(cu_seqlens, sum(lengths), 128, "last")[1][:2].tolist() == [640, 512]  # doc 1's last blocks
