"""The context-parallel core attention that fills megatron-core's ``core_attention`` slot."""
from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from csrc.select import varlen_attention_function
from engine.model.attention import causal_cu_seqlens
from engine.parallel.context.all_gather import all_gather_kv_attention
from engine.parallel.context.ulysses import ulysses_attention


class ContextParallelAttention(MegatronModule):
    """Document-masked causal attention with the sequence split over the CP group.

    Takes megatron's core-attention arguments for this rank's tokens: query [S/CP, b, heads, d],
    key/value [S/CP, b, kv_heads, d] (rotated with the tokens' global positions), and
    ``packed_seq_params`` whose cu_seqlens describe the *full* sequences (b x S tokens; every
    CP rank holds the same, see engine.training.data). Returns [S/CP, b, heads * d].
    ``backend``: a resolved attention kernel ("ours", "flash-attn" or "torch"); ``algorithm``
    one of engine.parallel.layout.CP_ALGORITHMS (validated with the layout).
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 algorithm: str = "all-gather", backend: str = "torch"):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.algorithm = algorithm
        self.attend = varlen_attention_function(backend)
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        group = self.cp_group or parallel_state.get_context_parallel_group()
        local_len, batch = query.shape[:2]
        seq_length = local_len * group.size()
        if packed_seq_params is None:
            cu_seqlens, max_seqlen = causal_cu_seqlens(batch, seq_length, query.device), seq_length
        else:
            cu_seqlens = packed_seq_params.cu_seqlens_q
            max_seqlen = int(packed_seq_params.max_seqlen_q)
        if self.algorithm == "all-gather":
            return all_gather_kv_attention(query, key, value, cu_seqlens, group,
                                           softmax_scale=self.softmax_scale, attend=self.attend)
        return ulysses_attention(query, key, value, cu_seqlens, max_seqlen, group,
                                 softmax_scale=self.softmax_scale, attend=self.attend)


def context_parallel_attention_spec(algorithm: str, backend: str) -> ModuleSpec:
    """The ``core_attention`` spec for CP ``algorithm`` with resolved attention ``backend``.

    transformer-engine's own CP attention is not offered: megatron masks packed documents in it
    only for THD inputs whose documents each divide by 2 x CP, which packed data does not give.
    """
    if backend == "transformer-engine":
        raise ValueError("kernels.attention 'transformer-engine' has no context-parallel path "
                         "here; use attention 'ours', 'flash-attn' or 'torch' with CP > 1")
    return ModuleSpec(module=ContextParallelAttention,
                      params={"algorithm": algorithm, "backend": backend})
