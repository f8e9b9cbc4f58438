"""Triton variable-length causal flash attention (FlashAttention-2 style), forward and backward.

Spec: csrc/attention/reference.py. Layout: q [Tq, Hq, D], k/v [Tk, Hkv, D], out [Tq, Hq, D],
lse [Hq, Tq] fp32 (natural log).

Work split:
- forward and dQ: one program per (query head, query block of one document). A block->document
  table built on the device (no host sync) tells each program its document, so it only walks the
  keys of that document up to its causal limit. Key blocks that every row of the query block sees
  run without masks; only the blocks crossing the diagonal or the document end are masked.
- dK/dV: one program per (KV head, key block of one document); it loops over the G query heads
  of its GQA group and over the query blocks that see its keys, so dK/dV need no atomics.
- delta = rowsum(dO * O) - dlse is a separate small kernel (dlse: gradient flowing into the
  returned lse, which merge_attention_outputs makes non-zero under context parallelism).

Scores are kept in base 2 (scale * log2(e) folded into the scores) so the inner loop uses exp2.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from csrc.triton_support import dot_in_fp32, dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _visible_key_range(m_start, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [0, unmasked_end) are seen by every row of the query block, [unmasked_end, key_end) by some."""
    if CAUSAL:
        diagonal = len_k - len_q
        key_end = tl.minimum(len_k, m_start + BLOCK_M + diagonal)
        seen_by_first_row = tl.minimum(len_k, m_start + 1 + diagonal)
    else:
        key_end = len_k
        seen_by_first_row = len_k
    key_end = tl.maximum(key_end, 0)
    unmasked_end = (tl.maximum(seen_by_first_row, 0) // BLOCK_N) * BLOCK_N
    return unmasked_end, key_end


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, len_q, len_k, qk_scale_log2,
    key_lo, key_hi,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(key_lo, key_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # [D, BLOCK_N]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # [BLOCK_N, D]
        if MASKED:
            key_ok = offs_n < len_k
            kt = tl.load(kt_ptrs, mask=key_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (len_k - len_q))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shifting by 0 instead keeps exp2 at 0
        # rather than exp2(-inf + inf) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _document_of_program(block_doc, block_row, cu_seqlens_q, cu_seqlens_k, n_programs):
    """(document or -1 for a spare program, first row/key of the block, q start, lq, k start, lk)."""
    # The block table lists the heaviest blocks first (_block_table), so they start first.
    blk = tl.program_id(1)
    doc = tl.load(block_doc + blk)
    safe_doc = tl.maximum(doc, 0)
    block_start = tl.load(block_row + blk)
    q_start = tl.load(cu_seqlens_q + safe_doc)
    len_q = tl.load(cu_seqlens_q + safe_doc + 1) - q_start
    k_start = tl.load(cu_seqlens_k + safe_doc)
    len_k = tl.load(cu_seqlens_k + safe_doc + 1) - k_start
    return doc, block_start, q_start, len_q, k_start, len_k


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, block_doc, block_row,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, n_programs, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    doc, m_start, q_start, len_q, k_start, len_k = _document_of_program(
        block_doc, block_row, cu_seqlens_q, cu_seqlens_k, n_programs)
    if doc >= 0:
        kv_head = head // GROUP

        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < len_q
        q_ptrs = Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        unmasked_end, key_end = _visible_key_range(m_start, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, len_q, len_k, qk_scale_log2,
            0, unmasked_end, BLOCK_N, HEAD_DIM, False, CAUSAL, DOT_FP32, DOT_PRECISION,
        )
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, len_q, len_k, qk_scale_log2,
            unmasked_end, key_end, BLOCK_N, HEAD_DIM, True, CAUSAL, DOT_FP32, DOT_PRECISION,
        )
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptrs = Out + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + head.to(tl.int64) * total_q + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    Out, dOut, dLse, Delta, stride_ot, stride_oh, stride_dot, stride_doh, total_q,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - dLse[h, t]."""
    head = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < total_q
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(Out + rows * stride_ot + head * stride_oh + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(dOut + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_offs = head.to(tl.int64) * total_q + offs_t
    if HAS_DLSE:
        delta -= tl.load(dLse + lse_offs, mask=ok, other=0.0)
    tl.store(Delta + lse_offs, delta, mask=ok)


@triton.jit
def _load_row_stats(Lse, Delta, lse_offs, row_ok):
    """lse in base 2 with rows that saw no key mapped to +inf, so exp2(s - lse) = 0 there."""
    lse = tl.load(Lse + lse_offs, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + lse_offs, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dq_key_loop(
    dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, len_q, len_k, qk_scale_log2,
    key_lo, key_hi,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(key_lo, key_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]
        if MASKED:
            key_ok = offs_n < len_k
            k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=key_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
        if DOT_FP32:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (len_k - len_q))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, dOut, dQ, Lse, Delta, cu_seqlens_q, cu_seqlens_k, block_doc, block_row,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, total_q, n_programs, qk_scale_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    doc, m_start, q_start, len_q, k_start, len_k = _document_of_program(
        block_doc, block_row, cu_seqlens_q, cu_seqlens_k, n_programs)
    if doc >= 0:
        kv_head = head // GROUP

        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < len_q
        rows = (q_start + offs_m)[:, None].to(tl.int64)
        q = tl.load(Q + rows * stride_qt + head * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(dOut + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2, delta = _load_row_stats(Lse, Delta, head.to(tl.int64) * total_q + q_start + offs_m, row_ok)
        k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        unmasked_end, key_end = _visible_key_range(m_start, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
        dq = _dq_key_loop(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, len_q, len_k, qk_scale_log2,
            0, unmasked_end, BLOCK_N, HEAD_DIM, False, CAUSAL, DOT_FP32, DOT_PRECISION,
        )
        dq = _dq_key_loop(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, len_q, len_k, qk_scale_log2,
            unmasked_end, key_end, BLOCK_N, HEAD_DIM, True, CAUSAL, DOT_FP32, DOT_PRECISION,
        )
        dq_ptrs = dQ + rows * stride_dqt + head * stride_dqh + offs_d[None, :]
        tl.store(dq_ptrs, (dq * softmax_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, len_q, len_k,
    qk_scale_log2, query_lo, query_hi,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Padding rows (>= len_q) load q = dO = 0 and lse = +inf, so they add exactly 0: only the causal
    # diagonal needs a mask here. Padding key columns are never stored.
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(query_lo, query_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < len_q
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        lse2, delta = _load_row_stats(lse_base, delta_base, offs_m, row_ok)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + (len_k - len_q), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, dOut, dK, dV, Lse, Delta, cu_seqlens_q, cu_seqlens_k, block_doc, block_row,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, total_q, n_programs, qk_scale_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    doc, n_start, q_start, len_q, k_start, len_k = _document_of_program(
        block_doc, block_row, cu_seqlens_q, cu_seqlens_k, n_programs)
    if doc >= 0:

        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_ok = offs_n < len_k
        keys = (k_start + offs_n)[:, None].to(tl.int64)
        k = tl.load(K + keys * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(V + keys * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Query rows that see key n satisfy i >= n - (len_k - len_q). Blocks below masked_end
        # cross the diagonal of this key block; blocks from masked_end on see all of its keys.
        query_hi = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
        if CAUSAL:
            diagonal = len_k - len_q
            query_lo = (tl.maximum(n_start - diagonal, 0) // BLOCK_M) * BLOCK_M
            masked_end = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - diagonal, 0), BLOCK_M) * BLOCK_M
            query_lo = tl.minimum(query_lo, query_hi)
            masked_end = tl.minimum(tl.maximum(masked_end, query_lo), query_hi)
        else:
            query_lo = 0
            masked_end = 0

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for g in range(GROUP):
            head = kv_head * GROUP + g
            q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
            do_base = dOut + q_start.to(tl.int64) * stride_dot + head * stride_doh
            lse_base = Lse + head.to(tl.int64) * total_q + q_start
            delta_base = Delta + head.to(tl.int64) * total_q + q_start
            dk, dv = _dkdv_query_loop(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, len_q, len_k,
                qk_scale_log2, query_lo, masked_end, BLOCK_M, HEAD_DIM, True, DOT_FP32, DOT_PRECISION,
            )
            dk, dv = _dkdv_query_loop(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, len_q, len_k,
                qk_scale_log2, masked_end, query_hi, BLOCK_M, HEAD_DIM, False, DOT_FP32, DOT_PRECISION,
            )
        tl.store(dK + keys * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                 (dk * softmax_scale).to(dK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(dV + keys * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(dV.dtype.element_ty), mask=key_ok[:, None])


def _block_table(cu_seqlens: torch.Tensor, total: int, block: int,
                 heavy_end: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map program index -> (document, first row of its block inside the document), on the device,
    heaviest blocks first.

    Under the causal mask a query block's work grows with its position in the document (it sees
    more keys) and a key block's shrinks (fewer queries see it): heavy_end="last" for tables of
    query blocks (forward, dQ), "first" for key blocks (dK/dV). Programs are sorted by that work,
    longest first, so that the heaviest start first and the short ones fill the tail of the grid.

    The number of blocks sum_d ceil(len_d / block) is at most ceil(total / block) + n_docs, so the
    grid uses that bound and the spare programs (document -1, sorted last) exit at once: no host
    sync. Returns block_doc int32 [P], block_row int32 [P], P.
    """
    if heavy_end not in ("first", "last"):
        raise ValueError(f"heavy_end={heavy_end!r} must be 'first' (key blocks) or 'last' (query blocks)")
    n_docs = cu_seqlens.numel() - 1
    n_programs = triton.cdiv(total, block) + n_docs
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    blocks_per_doc = (lengths + block - 1) // block
    block_ends = torch.cumsum(blocks_per_doc, 0)
    program = torch.arange(n_programs, device=cu_seqlens.device)
    doc = torch.searchsorted(block_ends, program, right=True)
    valid = doc < n_docs
    doc_clamped = doc.clamp(max=max(n_docs - 1, 0))
    first_block_of_doc = block_ends[doc_clamped] - blocks_per_doc[doc_clamped]
    row = (program - first_block_of_doc) * block
    length = lengths[doc_clamped]
    work = torch.minimum(row + block, length) if heavy_end == "last" else length - row
    order = torch.argsort(torch.where(valid, work, torch.full_like(work, -1)), descending=True, stable=True)
    block_doc = torch.where(valid, doc, torch.full_like(doc, -1))[order].to(torch.int32)
    block_row = torch.where(valid, row, torch.zeros_like(row))[order].to(torch.int32)
    return block_doc, block_row, n_programs


def default_blocks(head_dim: int, dtype: torch.dtype, interpreting: bool, arch: int = 90) -> dict[str, int]:
    """Tile sizes for compute capability ``arch`` (90: Hopper, 80: Ampere). GPU values start from the
    FA2 Triton tutorial's H100 choices (untimed here); each is compiled for sm_90 and sm_80 and
    checked for shared memory and register spills by tests/csrc/compile_for_gpu.py. fp32 (tests)
    halves the tiles so that its 4-byte tiles fit in shared memory. The interpreter uses 16 so
    small tests cover several blocks."""
    if interpreting:
        return dict(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkdv_m=16, dkdv_n=16, warps_fwd=4, warps_bwd=4, stages=1)
    if dtype == torch.float32:
        return dict(fwd_m=64, fwd_n=32, dq_m=64, dq_n=32, dkdv_m=32, dkdv_n=64, warps_fwd=4, warps_bwd=4, stages=2)
    warps_fwd = 4 if head_dim <= 64 else 8
    if arch >= 90:
        # 8 warps for the backward: with 4, dK/dV at head dim 128 spills 2.6 KB a thread and
        # ptxas serializes its wgmma (tests/csrc/compile_for_gpu.py).
        return dict(fwd_m=128, fwd_n=64, dq_m=128, dq_n=32, dkdv_m=32, dkdv_n=128, warps_fwd=warps_fwd,
                    warps_bwd=8, stages=3)
    # Ampere: no wgmma, fewer registers per tile; smaller backward tiles keep spills under 1 KB
    return dict(fwd_m=128, fwd_n=64, dq_m=64, dq_n=32, dkdv_m=32, dkdv_n=64, warps_fwd=warps_fwd, warps_bwd=4, stages=2)


# The tile configuration travels through the custom ops as a list of ints in this order.
TILE_KEYS = ("fwd_m", "fwd_n", "dq_m", "dq_n", "dkdv_m", "dkdv_n", "warps_fwd", "warps_bwd", "stages")


def _contiguous_rows(*tensors):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


@torch.library.custom_op("csrc::varlen_attention_forward", mutates_args=())
def varlen_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, Hq, D], lse [Hq, Tq] fp32) of validated inputs; tiles as listed by TILE_KEYS."""
    blocks = dict(zip(TILE_KEYS, tiles))
    q, k, v = _contiguous_rows(q, k, v)
    total_q, n_heads_q, head_dim = q.shape
    n_heads_kv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((n_heads_q, total_q), dtype=torch.float32, device=q.device)
    block_doc, block_row, n_programs = _block_table(cu_seqlens_q, total_q, blocks["fwd_m"], "last")
    _attn_fwd_kernel[(n_heads_q, n_programs)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_doc, block_row,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total_q, n_programs, softmax_scale * LOG2E,
        GROUP=n_heads_q // n_heads_kv, HEAD_DIM=head_dim, BLOCK_M=blocks["fwd_m"], BLOCK_N=blocks["fwd_n"],
        CAUSAL=causal, DOT_FP32=dot_in_fp32(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=blocks["warps_fwd"], num_stages=blocks["stages"],
    )
    return out, lse


@varlen_attention_forward.register_fake
def _varlen_attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, tiles):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("csrc::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(
    d_out: torch.Tensor | None, d_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); d_out or d_lse is None when that output received no gradient."""
    blocks, scale = dict(zip(TILE_KEYS, tiles)), softmax_scale
    q, k, v = _contiguous_rows(q, k, v)
    total_q, n_heads_q, head_dim = q.shape
    total_k, n_heads_kv, _ = k.shape
    group = n_heads_q // n_heads_kv
    d_out = torch.zeros_like(out) if d_out is None else _contiguous_rows(d_out)[0]
    if d_lse is not None:
        d_lse = d_lse.contiguous()  # the delta kernel indexes it as dense [Hq, Tq]; lse.sum() gives strides 0
    common = dict(GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal,
                  DOT_FP32=dot_in_fp32(q.dtype), DOT_PRECISION=dot_precision(q.dtype))

    delta = torch.empty_like(lse)
    block_t = 64
    _bwd_delta_kernel[(n_heads_q, triton.cdiv(total_q, block_t))](
        out, d_out, d_lse if d_lse is not None else lse, delta,
        out.stride(0), out.stride(1), d_out.stride(0), d_out.stride(1), total_q,
        HAS_DLSE=d_lse is not None, HEAD_DIM=head_dim, BLOCK_T=block_t,
    )

    dq = torch.empty_like(q)
    q_doc, q_row, n_q_programs = _block_table(cu_seqlens_q, total_q, blocks["dq_m"], "last")
    _attn_bwd_dq_kernel[(n_heads_q, n_q_programs)](
        q, k, v, d_out, dq, lse, delta, cu_seqlens_q, cu_seqlens_k, q_doc, q_row,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), d_out.stride(0), d_out.stride(1),
        dq.stride(0), dq.stride(1), total_q, n_q_programs, scale * LOG2E, scale,
        BLOCK_M=blocks["dq_m"], BLOCK_N=blocks["dq_n"], **common,
        num_warps=blocks["warps_bwd"], num_stages=blocks["stages"],
    )

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    k_doc, k_row, n_k_programs = _block_table(cu_seqlens_k, total_k, blocks["dkdv_n"], "first")
    _attn_bwd_dkdv_kernel[(n_heads_kv, n_k_programs)](
        q, k, v, d_out, dk, dv, lse, delta, cu_seqlens_q, cu_seqlens_k, k_doc, k_row,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), d_out.stride(0), d_out.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), total_q, n_k_programs, scale * LOG2E, scale,
        BLOCK_M=blocks["dkdv_m"], BLOCK_N=blocks["dkdv_n"], **common,
        num_warps=blocks["warps_bwd"], num_stages=blocks["stages"],
    )
    return dq, dk, dv


@varlen_attention_backward.register_fake
def _varlen_attention_backward_fake(d_out, d_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                    softmax_scale, causal, tiles):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, tiles = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    # An unused output (usually lse) then arrives as None instead of a zero tensor to read.
    ctx.set_materialize_grads(False)
    ctx.softmax_scale, ctx.causal, ctx.tiles = softmax_scale, causal, tiles


def _attention_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward(d_out, d_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                           ctx.softmax_scale, ctx.causal, ctx.tiles)
    return dq, dk, dv, None, None, None, None, None


varlen_attention_forward.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def triton_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, blocks=None):
    """Run the Triton kernels on validated inputs; see csrc.attention.varlen_attention."""
    from csrc.triton_support import triton_interpreting

    if blocks is None:
        arch = 10 * torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 90
        blocks = default_blocks(q.shape[-1], q.dtype, triton_interpreting(), arch)
    tiles = [int(blocks[key]) for key in TILE_KEYS]
    return varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, float(softmax_scale), bool(causal), tiles)
