"""Plain-PyTorch variable-length causal attention: the specification of the Triton kernel.

It is also the engine's CPU attention, so it is written to be differentiable by autograd, to never
build a mask over the whole packed sequence (a 128K x 128K mask is what crashes naive data loaders),
and to be reasonably fast: it loops over documents and, inside a document, over blocks of queries,
and each block only multiplies against the keys it can see. Peak memory is
O(heads x query_block x document_length), in backward too (each block is recomputed).

Layout (flash-attn "THD"): q [Tq, Hq, D], k/v [Tk, Hkv, D], documents delimited by cu_seqlens.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint


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
    recompute: bool = True,
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
        recompute: under autograd, recompute each block's scores in backward (activation
            checkpointing per block) so that training, too, keeps only O(query_block x lk) scores
            alive instead of all of them (about 1.3x the compute).

    Returns:
        out: [Tq, Hq, D] in q's dtype.
        lse: [Hq, Tq] fp32 (fp64 for fp64 inputs), natural-log log-sum-exp of the scaled scores.
    """
    total_q, n_heads_q, head_dim = q.shape
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
        k_doc = k[k0:k1].to(acc_dtype).permute(1, 0, 2)  # [Hkv, keys, D]
        v_doc = v[k0:k1].to(acc_dtype).permute(1, 0, 2)
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
            q_blk = q[q0 + first_seeing : q0 + m1]
            args = (q_blk, k_doc[:, :n_keys], v_doc[:, :n_keys], first_seeing, diagonal if causal else None, scale)
            if recompute and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                out_blk, lse = checkpoint(_attend_query_block, *args, use_reentrant=False)
            else:
                out_blk, lse = _attend_query_block(*args)
            out_pieces.append(out_blk)
            lse_pieces.append(lse)
    if not out_pieces:
        return q.new_zeros(q.shape), torch.full((n_heads_q, total_q), -math.inf, dtype=acc_dtype, device=q.device)
    return torch.cat(out_pieces, dim=0), torch.cat(lse_pieces, dim=1)


def _attend_query_block(q_blk, k_doc, v_doc, first_row, diagonal, scale):
    """Attention of rows [first_row, first_row + rows) of one document, all of which see a key.

    q_blk [rows, Hq, D] (input dtype); k_doc, v_doc [Hkv, keys, D] in the accumulation dtype, already
    cut to the keys the block's last row sees; diagonal = lk - lq, or None for non-causal.
    Returns out [rows, Hq, D] in q's dtype and lse [Hq, rows].
    """
    rows, n_heads_q, head_dim = q_blk.shape
    n_heads_kv, n_keys, _ = k_doc.shape
    group = n_heads_q // n_heads_kv
    q_acc = q_blk.to(k_doc.dtype) * scale  # scaling rows x D, not rows x keys
    # [Hkv, G * rows, D]: the G query heads of a group share one batched matmul against their
    # KV head, so K/V are never expanded G times.
    q_acc = q_acc.view(rows, n_heads_kv, group, head_dim).permute(1, 2, 0, 3).reshape(n_heads_kv, group * rows, head_dim)
    scores = torch.bmm(q_acc, k_doc.transpose(1, 2)).view(n_heads_kv, group, rows, n_keys)
    if diagonal is not None:
        row_ids = torch.arange(first_row, first_row + rows, device=q_blk.device)
        key_ids = torch.arange(n_keys, device=q_blk.device)
        hidden = key_ids[None, :] > row_ids[:, None] + diagonal
        scores = scores.masked_fill_(hidden, -math.inf)  # in place: bmm's backward does not need it
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, rows]
    probs = torch.exp(scores - lse.unsqueeze(-1)).view(n_heads_kv, group * rows, n_keys)
    out = torch.bmm(probs, v_doc).view(n_heads_kv, group, rows, head_dim)
    return out.permute(2, 0, 1, 3).reshape(rows, n_heads_q, head_dim).to(q_blk.dtype), lse.reshape(n_heads_q, rows)
