"""Ulysses context-parallel attention (DeepSpeed-Ulysses; ProLong trained 512K with it).

An all-to-all trades sequence shards for head shards: before attention each rank holds all S
tokens of heads/CP heads, so documents are intact and the ordinary document-masked attention
runs locally; a second all-to-all trades back. Communication per layer is ~4 x (tokens x hidden
/ CP) per rank whatever CP is, but CP must divide the query heads of a tensor-parallel rank.
KV heads fewer than CP (GQA) are repeated first, as ProLong repeats Llama-3's 8 KV heads to 32.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from csrc.attention import varlen_attention
from engine.parallel.context.chunks import device_permutation
from engine.parallel.context.comm import ulysses_all_to_all


def repeated_kv_heads(kv_heads: int, query_heads: int, cp_size: int) -> int:
    """KV heads after repetition: the fewest multiple of ``kv_heads`` that CP divides.

    lcm(kv_heads, CP) divides query_heads whenever both do, so each rank's query heads still
    read whole KV heads (GQA groups stay intact).
    """
    repeated = math.lcm(kv_heads, cp_size)
    if query_heads % repeated:
        raise ValueError(f"cannot repeat {kv_heads} KV heads to a multiple of CP {cp_size} "
                         f"that divides {query_heads} query heads")
    return repeated


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int, group, softmax_scale=None,
                      attend=varlen_attention) -> torch.Tensor:
    """Document-masked causal attention of this rank's tokens via head-sharded full sequences.

    Args:
        query: [S / CP, b, heads, d]; key, value: [S / CP, b, kv_heads, d] (rotated), this rank's
            load-balanced chunks of each of the b sequences; heads % CP == 0.
        cu_seqlens: int32 document boundaries over the b x S tokens of the full sequences;
            max_seqlen: the longest document.
        group: the context-parallel process group.
        attend: varlen attention function (csrc.select.varlen_attention_function).
    Returns [S / CP, b, heads * d].
    """
    cp_size = dist.get_world_size(group)
    local_len, batch, heads, dim = query.shape
    kv_heads = key.shape[2]
    if heads % cp_size:
        raise ValueError(f"Ulysses needs the {heads} local query heads divisible by "
                         f"context_parallel_size {cp_size}")
    seq_length = local_len * cp_size
    kv_repeated = repeated_kv_heads(kv_heads, heads, cp_size)
    if kv_repeated != kv_heads:
        # repeat_interleave keeps query head h on KV head h // (heads / kv_heads).
        key = key.repeat_interleave(kv_repeated // kv_heads, dim=2)
        value = value.repeat_interleave(kv_repeated // kv_heads, dim=2)
    q_per, kv_per = heads // cp_size, kv_repeated // cp_size

    def head_blocks(x, per):  # [s, b, h, d] -> [CP, s, b, h / CP, d]: head group j for rank j
        return x.view(local_len, batch, cp_size, per, dim).permute(2, 0, 1, 3, 4)

    # One exchange for Q, K and V of each head group.
    sent = torch.cat([head_blocks(query, q_per), head_blocks(key, kv_per),
                      head_blocks(value, kv_per)], dim=3)
    received = ulysses_all_to_all(sent, group)  # block j: rank j's tokens, my head group
    order = device_permutation("gathered_to_sequence", seq_length, cp_size, query.device)
    # [CP, s, b, h', d] -> [b, S, h', d] in sequence order -> tokens [b * S, h', d].
    full = received.reshape(seq_length, batch, -1, dim).transpose(0, 1).index_select(1, order)
    full = full.reshape(batch * seq_length, -1, dim)
    q_full, k_full, v_full = (t.contiguous() for t in full.split([q_per, kv_per, kv_per], dim=1))
    out, _ = attend(q_full, k_full, v_full, cu_seqlens, cu_seqlens, max_seqlen,
                              max_seqlen, softmax_scale=softmax_scale, causal=True)
    # Back to rank order, then trade heads for sequence: block j returns to rank j.
    back_order = device_permutation("sequence_to_gathered", seq_length, cp_size, query.device)
    out = out.view(batch, seq_length, q_per, dim).index_select(1, back_order)
    out = out.view(batch, cp_size, local_len, q_per, dim).permute(1, 2, 0, 3, 4)
    returned = ulysses_all_to_all(out, group)  # block j: my tokens, head group j
    return returned.permute(1, 2, 0, 3, 4).reshape(local_len, batch, heads * dim)
