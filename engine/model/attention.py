"""Document-masked attention and per-token RoPE positions, plugged into megatron-core.

megatron's local attention builds a dense causal mask and refuses packed sequences; this module
fills the spec's ``core_attention`` slot instead. Packed documents arrive as cumulative lengths
(``PackedSeqParams.cu_seqlens_q`` over the micro-batch's flattened tokens, in megatron's sbhd
layout), and no token attends across a document boundary. No seq x seq mask is ever built.

RoPE positions are per token (``position_ids``), so they can run on across packed documents
(ProLong) or restart at each document, and stay right on every context-parallel rank. The
positions' angles are computed once per forward (PerTokenRotaryEmbedding) and reach every layer
through megatron's ``rotary_pos_emb`` argument, whichever kernel then rotates q and k.

Kernel choices (engine.model.kernels) land here: the attention backend, RoPE through csrc.rope
(RotaryKernelSelfAttention) and the fused output layer + cross-entropy (LlamaGPTModel).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from csrc.select import select_attention_backend, varlen_attention_function
from engine.model.kernels import SummedTokenLoss, csrc_impl


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
    ``backend``: "auto" | "ours" | "flash-attn" | "torch" (csrc.select); "transformer-engine"
    is a module of its own (TransformerEngineDocumentAttention).
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
        if backend == "transformer-engine":
            raise ValueError("attention backend 'transformer-engine' is built as "
                             "TransformerEngineDocumentAttention; use engine.model.specs."
                             "core_attention_spec('transformer-engine')")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.requested_backend = backend

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        seq, batch = query.shape[:2]
        cu_seqlens, max_seqlen = _documents(packed_seq_params, batch, seq, query.device)
        # Resolved per call: "auto" depends on the device the activations are on.
        attend = varlen_attention_function(select_attention_backend(self.requested_backend,
                                                                    query.device))
        out, _ = attend(_sbhd_to_tokens(query), _sbhd_to_tokens(key), _sbhd_to_tokens(value),
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

    def __init__(self, *args, rope_impl: str = "triton", **kwargs):
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
    from csrc.rope import apply_rope_cos_sin

    seq, batch, heads, dim = x.shape
    half = angles.shape[-1] // 2
    angles = angles[:, :, 0, :half].reshape(seq * batch, half)
    rotated = apply_rope_cos_sin(x.reshape(seq * batch, heads, dim), angles.cos(), angles.sin(),
                                 impl=impl)
    return rotated.view(seq, batch, heads, dim)


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
    """megatron's GPTModel whose RoPE follows the ``position_ids`` it is called with.

    ``cross_entropy``: "megatron" (output layer, then vocab-parallel cross-entropy; returns
    per-token losses [b, s]) or "fused" (csrc.linear_cross_entropy on the output layer's weight
    shard, never holding the [tokens, vocab] logits; returns SummedTokenLoss over the tokens
    where ``loss_mask`` is nonzero). Without labels both return logits.
    """

    def __init__(self, *args, rotary_base: float, cross_entropy: str = "megatron", **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        if cross_entropy not in ("megatron", "fused"):
            raise ValueError(f"cross_entropy={cross_entropy!r} must be 'megatron' or 'fused' "
                             "(resolve KernelChoices first)")
        if cross_entropy == "fused" and self.config.mtp_num_layers:
            raise ValueError("cross_entropy='fused' does not cover multi-token prediction; "
                             "use cross_entropy='megatron' with mtp_num_layers")
        self.cross_entropy = cross_entropy
        self.rotary_pos_emb = PerTokenRotaryEmbedding(self.config.kv_channels, rotary_base)

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        self.rotary_pos_emb.positions = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self.rotary_pos_emb.positions = None

    def _postprocess(self, hidden_states, *args, labels=None, loss_mask=None,
                     inference_context=None, **kwargs):
        if (self.cross_entropy == "megatron" or labels is None or not self.post_process
                or inference_context is not None):
            return super()._postprocess(hidden_states, *args, labels=labels, loss_mask=loss_mask,
                                        inference_context=inference_context, **kwargs)
        return self._fused_output_loss(hidden_states, labels, loss_mask)

    def _fused_output_loss(self, hidden_states, labels, loss_mask) -> SummedTokenLoss:
        from csrc.linear_cross_entropy import fused_linear_cross_entropy

        layer = self.output_layer
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else layer.weight)
        tp_group = layer.tp_group
        tp_size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        # The hidden states enter the vocabulary shards as they enter megatron's output layer:
        # all-gathered from sequence-parallel slices (reduce-scatter in backward) or copied
        # (all-reduce in backward), summing each shard's partial gradient.
        if layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=tp_group)
        elif tp_size > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        # hidden [s, b, H] is s-major; labels and mask are [b, s].
        labels = labels.transpose(0, 1).reshape(-1)
        if loss_mask is not None:
            loss_mask = loss_mask.transpose(0, 1).reshape(-1)
        loss_sum, num_tokens = fused_linear_cross_entropy(
            hidden_states.reshape(-1, hidden_states.shape[-1]), weight, labels, loss_mask,
            tp_group=tp_group if tp_size > 1 else None, impl=csrc_impl("fused"))
        return SummedTokenLoss(loss_sum, num_tokens)
