"""Document-masked attention and per-token RoPE positions, plugged into megatron-core.

megatron's local attention builds a dense causal mask and refuses packed sequences; this module
fills the spec's ``core_attention`` slot instead. Packed documents arrive as cumulative lengths
(``PackedSeqParams.cu_seqlens_q`` over the micro-batch's flattened tokens, in megatron's sbhd
layout), and no token attends across a document boundary. No seq x seq mask is ever built.

RoPE angles arrive per token through megatron's ``rotary_pos_emb`` argument (computed once per
forward by engine.model.gpt.PerTokenRotaryEmbedding); RotaryKernelSelfAttention rotates q and k
with csrc.rope instead of megatron's RoPE when kernels.rope is "ours".
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from csrc.rope import apply_rope_cos_sin
from csrc.select import varlen_attention_function


def causal_cu_seqlens(batch: int, seq_length: int, device=None) -> torch.Tensor:
    """cu_seqlens when each sequence of the micro-batch is one document."""
    return torch.arange(0, (batch + 1) * seq_length, seq_length, dtype=torch.int32, device=device)


def _documents(packed_seq_params: Optional[PackedSeqParams], batch: int, seq: int, device):
    """(cu_seqlens over the micro-batch's b-major flattened tokens, longest document)."""
    if packed_seq_params is None:
        return causal_cu_seqlens(batch, seq, device=device), seq
    return packed_seq_params.cu_seqlens_q, int(packed_seq_params.max_seqlen_q)


def _sbhd_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> [b*s, h, d]: sequences back to back, as cu_seqlens counts them."""
    seq, batch, heads, dim = x.shape
    return x.transpose(0, 1).reshape(batch * seq, heads, dim)


def _tokens_to_sbh(out: torch.Tensor, seq: int, batch: int) -> torch.Tensor:
    """[b*s, h, d] or [b*s, h*d] -> [s, b, h*d], megatron's core-attention output layout."""
    return out.reshape(batch, seq, -1).transpose(0, 1).contiguous()


class DocumentMaskedAttention(MegatronModule):
    """softmax(QK^T / sqrt(d)) V, causal within each packed document, GQA-aware.

    Takes megatron's core-attention arguments: query [s, b, heads, d], key/value
    [s, b, kv_heads, d] (already projected and rotated), returns [s, b, heads * d].
    ``backend``: a resolved attention kernel, "ours" | "flash-attn" | "torch";
    "transformer-engine" is a module of its own (TransformerEngineDocumentAttention).
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 backend: str = "torch"):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                "DocumentMaskedAttention runs one context-parallel rank; use a context-parallel "
                "attention (engine.parallel.context) for context_parallel_size "
                f"{config.context_parallel_size}")
        if backend == "transformer-engine":
            raise ValueError("attention backend 'transformer-engine' is built as "
                             "TransformerEngineDocumentAttention; use engine.model.specs."
                             "core_attention_spec('transformer-engine')")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.attend = varlen_attention_function(backend)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        seq, batch = query.shape[:2]
        cu_seqlens, max_seqlen = _documents(packed_seq_params, batch, seq, query.device)
        out, _ = self.attend(_sbhd_to_tokens(query), _sbhd_to_tokens(key), _sbhd_to_tokens(value),
                        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                        softmax_scale=self.softmax_scale, causal=True)
        return _tokens_to_sbh(out, seq, batch)


class TransformerEngineDocumentAttention(MegatronModule):
    """Document-masked attention through megatron's TEDotProductAttention (cuDNN / flash).

    TE reads cu_seqlens as document boundaries only in its THD layout (in sbhd it takes them
    as one padded length per sequence), so this wrapper flattens megatron's [s, b] tokens to
    THD with a "thd" PackedSeqParams; TE then applies padding_causal masking per document.
    Needs CUDA and transformer-engine; not exercised on the CPU test machine.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("TransformerEngineDocumentAttention runs one context-parallel rank; "
                             "use engine.parallel.context for context_parallel_size "
                             f"{config.context_parallel_size}")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        self.te_attention = TEDotProductAttention(
            config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type=attention_type, attention_dropout=attention_dropout,
            softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        seq, batch = query.shape[:2]
        cu_seqlens, max_seqlen = _documents(packed_seq_params, batch, seq, query.device)
        thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                              max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
        out = self.te_attention(_sbhd_to_tokens(query), _sbhd_to_tokens(key),
                                _sbhd_to_tokens(value), None,
                                attn_mask_type=AttnMaskType.causal, packed_seq_params=thd)
        return _tokens_to_sbh(out, seq, batch)


class RotaryKernelSelfAttention(SelfAttention):
    """megatron's SelfAttention with q and k rotated by csrc.rope instead of megatron's RoPE.

    The angles are the same ``rotary_pos_emb`` the model computed from its positions (one source
    of truth); they are taken from megatron before its own RoPE and applied to q and k straight
    after the QKV projection, i.e. where megatron would apply them. Held only for one forward call,
    so activation recomputation, which calls forward again with the same arguments, sees them too.
    """

    def __init__(self, *args, rope_impl: str = "ours", **kwargs):
        super().__init__(*args, **kwargs)
        self.rope_impl = rope_impl
        self._rotary_angles: Optional[torch.Tensor] = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if isinstance(rotary_pos_emb, tuple):
            raise ValueError("RotaryKernelSelfAttention takes one angle tensor for q and k, "
                             "got a (q, k) pair; use rope='torch' for separate embeddings")
        self._rotary_angles = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None,
                                   **kwargs)
        finally:
            self._rotary_angles = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rotary_angles is None:
            return qkv
        query, key, *rest = qkv
        return (self._rotate(query), self._rotate(key), *rest)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_by_angles(x, self._rotary_angles, self.rope_impl)


def rotate_by_angles(x: torch.Tensor, angles: torch.Tensor, impl: str) -> torch.Tensor:
    """RoPE with csrc.rope on x [s, b, heads, d] by megatron-layout angles [s, b, 1, rot].

    megatron's angles hold each frequency twice (rotate-half layout); csrc.rope takes the
    cos/sin of one copy per token, [s*b, rot/2].
    """
    seq, batch, heads, dim = x.shape
    half = angles.shape[-1] // 2
    angles = angles[:, :, 0, :half].reshape(seq * batch, half)
    rotated = apply_rope_cos_sin(x.reshape(seq * batch, heads, dim), angles.cos(), angles.sin(),
                                 impl=impl)
    return rotated.view(seq, batch, heads, dim)
