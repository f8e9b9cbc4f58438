"""All-gather K/V context-parallel attention (as Llama 3 trained 128K tokens with CP16).

Each rank keeps its own queries (chunks r and 2CP-1-r of every sequence), all-gathers keys and
values of the whole sequence, and attends with document masks. A query chunk of a document sees
that document's keys from its start up to the query itself: varlen attention with the
bottom-right causal alignment does exactly that when the query segment is given the key range
[document start, end of the query segment). Unlike a ring, the work of a rank does not depend on
where document boundaries fall, and nothing is skipped or merged.

The backward reduce-scatters dK/dV (engine.parallel.context.comm.all_gather_sequence).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from csrc.attention import varlen_attention
from engine.device import copy_to, host_copy
from engine.parallel.context.chunks import device_permutation, load_balanced_chunks
from engine.parallel.context.comm import all_gather_sequence


@dataclass(frozen=True)
class ChunkAttentionPlan:
    """varlen arguments for one local query chunk against the full gathered keys.

    Entry i pairs the chunk's queries of document i (possibly none) with the keys
    [document start, min(document end, chunk end)); the keys after the chunk end of a document
    that goes on form an entry with no queries, so the key entries tile all b x S tokens.
    """
    cu_seqlens_q: torch.Tensor  # int32 [entries + 1] over the chunk's b x C queries
    cu_seqlens_k: torch.Tensor  # int32 [entries + 1] over the b x S gathered keys
    max_seqlen_q: int
    max_seqlen_k: int


def chunk_attention_plan(cu_seqlens: np.ndarray, seq_length: int, chunk: int,
                         chunk_len: int) -> ChunkAttentionPlan:
    """Plan for chunk ``chunk`` (of length ``chunk_len`` tokens) of every sequence.

    ``cu_seqlens`` are the document boundaries over the micro-batch's b x S flattened tokens
    (documents never cross a sequence boundary).
    """
    entries_q, entries_k = [], []
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    for doc_start, doc_end in zip(starts.tolist(), ends.tolist()):
        if doc_end == doc_start:
            continue
        sequence = doc_start // seq_length
        q_lo = sequence * seq_length + chunk * chunk_len
        q_hi = q_lo + chunk_len
        lo, hi = max(doc_start, q_lo), min(doc_end, q_hi)
        if lo < hi:
            entries_q.append(hi - lo)
            entries_k.append(hi - doc_start)
            if hi < doc_end:  # the rest of the document: keys no query of this chunk sees
                entries_q.append(0)
                entries_k.append(doc_end - hi)
        else:
            entries_q.append(0)
            entries_k.append(doc_end - doc_start)
    cu_q = np.zeros(len(entries_q) + 1, dtype=np.int32)
    cu_k = np.zeros(len(entries_k) + 1, dtype=np.int32)
    np.cumsum(entries_q, out=cu_q[1:])
    np.cumsum(entries_k, out=cu_k[1:])
    return ChunkAttentionPlan(torch.from_numpy(cu_q), torch.from_numpy(cu_k),
                              max(entries_q), max(entries_k))


# Plans per cu_seqlens tensor: every layer of a micro-batch reuses one cu_seqlens, and only the
# first should pay the device -> host copy. Keyed by id() with a weak reference that confirms the
# id still names the same tensor and drops the entry when the tensor dies.
_PLANS: dict[int, tuple[weakref.ref, tuple, tuple[ChunkAttentionPlan, ...]]] = {}


def rank_attention_plans(cu_seqlens: torch.Tensor, seq_length: int, cp_rank: int,
                         cp_size: int) -> tuple[ChunkAttentionPlan, ChunkAttentionPlan]:
    """The plans of rank ``cp_rank``'s two chunks (cached per cu_seqlens tensor and version)."""
    key = (cu_seqlens._version, seq_length, cp_rank, cp_size, cu_seqlens.device)
    entry = _PLANS.get(id(cu_seqlens))
    if entry is not None and entry[0]() is cu_seqlens and entry[1] == key:
        return entry[2]
    bounds = host_copy(cu_seqlens).numpy().astype(np.int64)
    if bounds[-1] % seq_length:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} tokens, not a whole number of "
                         f"sequences of {seq_length}: under context parallelism cu_seqlens "
                         "describes the full sequences (every rank holds the same)")
    chunk_len = seq_length // (2 * cp_size)
    plans = tuple(
        _to_device(chunk_attention_plan(bounds, seq_length, chunk, chunk_len), cu_seqlens.device)
        for chunk in load_balanced_chunks(cp_rank, cp_size))
    tensor_id = id(cu_seqlens)
    _PLANS[tensor_id] = (weakref.ref(cu_seqlens, lambda _: _PLANS.pop(tensor_id, None)), key,
                         plans)
    return plans


def _to_device(plan: ChunkAttentionPlan, device) -> ChunkAttentionPlan:
    # Host copies kept: the attention kernel checks the boundaries without reading the GPU.
    return ChunkAttentionPlan(copy_to(plan.cu_seqlens_q, device, keep_host_copy=True),
                              copy_to(plan.cu_seqlens_k, device, keep_host_copy=True),
                              plan.max_seqlen_q, plan.max_seqlen_k)


def all_gather_kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            cu_seqlens: torch.Tensor, group, softmax_scale=None,
                            attend=varlen_attention) -> torch.Tensor:
    """Document-masked causal attention of this rank's queries over the whole sequence.

    Args:
        query: [S / CP, b, heads, d]; key, value: [S / CP, b, kv_heads, d] (rotated), this rank's
            load-balanced chunks [chunk r, chunk 2CP-1-r] of each of the b sequences.
        cu_seqlens: int32 document boundaries over the b x S tokens of the *full* sequences.
        group: the context-parallel process group.
        attend: varlen attention function (csrc.select.varlen_attention_function).
    Returns [S / CP, b, heads * d].
    """
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    local_len, batch, heads, dim = query.shape
    kv_heads = key.shape[2]
    seq_length = local_len * cp_size
    chunk_len = local_len // 2
    # One collective for K and V; gathered blocks are rank-ordered, then put in sequence order.
    gathered = all_gather_sequence(torch.cat([key, value], dim=2), group)
    order = device_permutation("gathered_to_sequence", seq_length, cp_size, query.device)
    # [S, b, 2kv, d] -> [b * S, 2kv, d] in one copy: sequences back to back, as cu_seqlens.
    tokens = gathered.transpose(0, 1).index_select(1, order).reshape(
        batch * seq_length, 2 * kv_heads, dim)
    key_tokens = tokens[:, :kv_heads].contiguous()
    value_tokens = tokens[:, kv_heads:].contiguous()

    outputs = []
    for slot, plan in enumerate(rank_attention_plans(cu_seqlens, seq_length, cp_rank, cp_size)):
        q_chunk = query[slot * chunk_len:(slot + 1) * chunk_len]
        q_tokens = q_chunk.transpose(0, 1).reshape(batch * chunk_len, heads, dim)
        out, _ = attend(q_tokens, key_tokens, value_tokens, plan.cu_seqlens_q,
                                  plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
                                  softmax_scale=softmax_scale, causal=True)
        outputs.append(out.view(batch, chunk_len, heads * dim))
    return torch.cat(outputs, dim=1).transpose(0, 1).contiguous()
