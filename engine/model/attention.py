"""Document-masked attention and per-token RoPE positions, plugged into megatron-core.

megatron's local attention builds a dense causal mask and refuses packed sequences; this module
fills the spec's ``core_attention`` slot instead. Packed documents arrive as cumulative lengths
(``PackedSeqParams.cu_seqlens_q`` over the micro-batch's flattened tokens, in megatron's sbhd
layout), and no token attends across a document boundary. No seq x seq mask is ever built.

RoPE positions are per token (``position_ids``), so they can run on across packed documents
(ProLong) or restart at each document, and stay right on every context-parallel rank.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from csrc.attention import varlen_attention
from csrc.select import select_attention_backend


def causal_cu_seqlens(batch: int, seq_length: int, device=None) -> torch.Tensor:
    """cu_seqlens when each sequence of the micro-batch is one document."""
    return torch.arange(0, (batch + 1) * seq_length, seq_length, dtype=torch.int32, device=device)


class DocumentMaskedAttention(MegatronModule):
    """softmax(QK^T / sqrt(d)) V, causal within each packed document, GQA-aware.

    Takes megatron's core-attention arguments: query [s, b, heads, d], key/value
    [s, b, kv_heads, d] (already projected and rotated), returns [s, b, heads * d].
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 backend: str = "auto"):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                "DocumentMaskedAttention runs one context-parallel rank; use a context-parallel "
                "attention (engine.parallel.context) for context_parallel_size "
                f"{config.context_parallel_size}")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.requested_backend = backend

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        seq, batch, heads, dim = query.shape
        if packed_seq_params is None:
            cu_seqlens = causal_cu_seqlens(batch, seq, device=query.device)
            max_seqlen = seq
        else:
            cu_seqlens = packed_seq_params.cu_seqlens_q
            max_seqlen = int(packed_seq_params.max_seqlen_q)
        # [s, b, h, d] -> [b*s, h, d]: sequences back to back, as cu_seqlens counts them.
        def to_tokens(x):
            return x.transpose(0, 1).reshape(batch * seq, x.shape[2], dim)

        backend = select_attention_backend(self.requested_backend, query.device)
        impl = {"ours": "triton", "torch": "reference"}.get(backend)
        if impl is None:
            raise NotImplementedError(f"attention backend {backend!r} is not wired in yet")
        out, _ = varlen_attention(to_tokens(query), to_tokens(key), to_tokens(value),
                                  cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  softmax_scale=self.softmax_scale, causal=True, impl=impl)
        return out.reshape(batch, seq, heads * dim).transpose(0, 1).contiguous()


class PerTokenRotaryEmbedding(torch.nn.Module):
    """RoPE angles for explicit positions, in the form megatron's apply_rotary_pos_emb takes.

    megatron's own RotaryEmbedding knows only positions 0..s-1; this one returns the angles of
    the positions the model was last called with: [s, b, 1, head_dim].
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.base = float(base)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.positions: Optional[torch.Tensor] = None

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def forward(self, seq_len: int = 0, *args, **kwargs) -> torch.Tensor:
        if self.positions is None:
            raise RuntimeError("PerTokenRotaryEmbedding used before positions were set")
        # Angles in fp64 then cast: positions reach 5e5 and bases 1.28e8, where fp32 products
        # lose the low bits that distinguish neighbouring tokens.
        angles = self.positions.double().t()[:, :, None] * self.inv_freq.double()
        return torch.cat([angles, angles], dim=-1)[:, :, None, :].float()


class LlamaGPTModel(GPTModel):
    """megatron's GPTModel whose RoPE follows the ``position_ids`` it is called with."""

    def __init__(self, *args, rotary_base: float, **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        self.rotary_pos_emb = PerTokenRotaryEmbedding(self.config.kv_channels, rotary_base)

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        self.rotary_pos_emb.positions = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self.rotary_pos_emb.positions = None
