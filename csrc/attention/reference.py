"""Plain-PyTorch variable-length causal attention: the specification of the Triton kernel.

It is also the engine's CPU attention, so it is written to be differentiable by autograd, to never
build a mask over the whole packed sequence (a 128K x 128K mask is what crashes naive data loaders),
and to be reasonably fast: it loops over documents and, inside a document, over blocks of queries,
and each block only multiplies against the keys it can see. Peak memory is
O(heads x query_block x document_length).

Layout (flash-attn "THD"): q [Tq, Hq, D], k/v [Tk, Hkv, D], documents delimited by cu_seqlens.
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for 16-bit inputs; fp64 stays fp64 so tests can build an exact oracle.
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = True,
    query_block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-masked attention over packed sequences, differentiable by autograd.

    Args:
        q: [Tq, Hq, D] queries of all documents back to back.
        k, v: [Tk, Hkv, D] keys/values; Hq must be a multiple of Hkv (GQA: query head h reads
            KV head h // (Hq // Hkv)).
        cu_seqlens_q, cu_seqlens_k: int [n_docs + 1] token offsets of each document in q and k.
        softmax_scale: multiplier of q.k before the softmax; default 1 / sqrt(D).
        causal: if True, query i of a document with lq queries and lk keys sees keys
            j <= i + lk - lq (bottom-right alignment, flash-attn >= 2.1); a query that sees no
            key gets out = 0 and lse = -inf.
        query_block: queries processed together; bounds memory at Hq x query_block x lk scores.

    Returns:
        out: [Tq, Hq, D] in q's dtype.
        lse: [Hq, Tq] fp32 (fp64 for fp64 inputs), natural-log log-sum-exp of the scaled scores.
    """
    total_q, n_heads_q, head_dim = q.shape
    n_heads_kv = k.shape[1]
    group = n_heads_q // n_heads_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    acc_dtype = _compute_dtype(q.dtype)
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()

    out_pieces: list[torch.Tensor] = []
    lse_pieces: list[torch.Tensor] = []
    for doc in range(len(starts_q) - 1):
        q0, q1 = starts_q[doc], starts_q[doc + 1]
        k0, k1 = starts_k[doc], starts_k[doc + 1]
        len_q, len_k = q1 - q0, k1 - k0
        diagonal = len_k - len_q if causal else 0
        # Keys as [Hkv, 1, keys, D] so that the G query heads of a group broadcast against them.
        k_doc = k[k0:k1].to(acc_dtype).permute(1, 0, 2).unsqueeze(1)
        v_doc = v[k0:k1].to(acc_dtype).permute(1, 0, 2).unsqueeze(1)
        for m0 in range(0, len_q, query_block):
            m1 = min(m0 + query_block, len_q)
            if causal:
                # Rows m0 <= i < first_seeing see no key at all: their output is defined as
                # 0 / -inf. Cutting them out keeps every softmax row non-empty, so neither the
                # forward nor autograd ever evaluates -inf - -inf.
                first_seeing = min(max(m0, -diagonal), m1)
                n_keys = max(0, min(len_k, m1 + diagonal))
            else:
                first_seeing = m0 if len_k > 0 else m1
                n_keys = len_k
            if first_seeing > m0:
                blind = first_seeing - m0
                out_pieces.append(q.new_zeros(blind, n_heads_q, head_dim))
                lse_pieces.append(torch.full((n_heads_q, blind), -math.inf, dtype=acc_dtype, device=q.device))
            if first_seeing == m1:
                continue
            rows = m1 - first_seeing
            q_blk = q[q0 + first_seeing : q0 + m1].to(acc_dtype)
            q_blk = q_blk.view(rows, n_heads_kv, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, rows, D]
            scores = torch.matmul(q_blk, k_doc[:, :, :n_keys].transpose(-1, -2)) * scale  # [Hkv, G, rows, keys]
            if causal:
                row_ids = torch.arange(first_seeing, m1, device=q.device)
                key_ids = torch.arange(n_keys, device=q.device)
                hidden = key_ids[None, :] > row_ids[:, None] + diagonal
                scores = scores.masked_fill(hidden, -math.inf)
            lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, rows]
            probs = torch.exp(scores - lse.unsqueeze(-1))
            out_blk = torch.matmul(probs, v_doc[:, :, :n_keys])  # [Hkv, G, rows, D]
            out_pieces.append(out_blk.permute(2, 0, 1, 3).reshape(rows, n_heads_q, head_dim).to(q.dtype))
            lse_pieces.append(lse.reshape(n_heads_q, rows))
    if not out_pieces:
        return q.new_zeros(q.shape), torch.full((n_heads_q, total_q), -math.inf, dtype=acc_dtype, device=q.device)
    return torch.cat(out_pieces, dim=0), torch.cat(lse_pieces, dim=1)
