"""Llama-3 as megatron-core's GPTModel: RoPE that follows explicit per-token positions, and the
output layer + cross-entropy as one fused kernel.

RoPE positions are per token (``position_ids``), so they can run on across packed documents
(ProLong) or restart at each document, and stay right on every context-parallel rank. Their
angles are computed once per forward (PerTokenRotaryEmbedding) and reach every layer through
megatron's ``rotary_pos_emb`` argument, whichever kernel then rotates q and k.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from csrc.linear_cross_entropy import fused_linear_cross_entropy, linear_token_scores
from csrc.rope import scale_inv_freq


class SummedTokenLoss(NamedTuple):
    """What the model returns when the fused output layer + cross-entropy computed the loss.

    loss_sum: fp32 scalar summed over counted tokens (differentiable); num_tokens: int scalar.
    The training step divides by the global batch's token count, as for per-token losses.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor


class PerTokenRotaryEmbedding(torch.nn.Module):
    """RoPE angles for explicit positions, in the form megatron's apply_rotary_pos_emb takes.

    megatron's own RotaryEmbedding knows only positions 0..s-1; this one returns the angles of
    the positions the model was last called with: [s, b, 1, head_dim]. ``scaling``: None (plain
    RoPE) or Llama-3.1's frequency scaling as a mapping (csrc.rope's reference defines it).
    """

    def __init__(self, head_dim: int, base: float, scaling: Optional[dict] = None):
        super().__init__()
        self.base = float(base)
        self.scaling = scaling
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        inv_freq = scale_inv_freq(inv_freq, scaling)
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


class TokenScores(NamedTuple):
    """What the model returns while scoring (LlamaGPTModel.scoring): per token, the
    cross-entropy of its label and the most likely next id, over the full vocabulary."""

    loss: torch.Tensor  # fp32 [b, s]
    argmax: torch.Tensor  # int64 [b, s]


class LlamaGPTModel(GPTModel):
    """megatron's GPTModel whose RoPE follows the ``position_ids`` it is called with.

    ``cross_entropy``: "torch" (megatron's output layer, then its vocab-parallel cross-entropy;
    returns per-token losses [b, s]) or "ours" (csrc.linear_cross_entropy on the output layer's
    weight shard, never holding the [tokens, vocab] logits; returns SummedTokenLoss over the
    tokens where ``loss_mask`` is nonzero). Without labels both return logits.
    ``rope_frequency_scaling``: Llama-3.1's RoPE scaling as a mapping, or None for plain RoPE
    (megatron's own ``rope_scaling`` flag hard-codes Llama-3.1's numbers; this takes any). With
    ``scoring`` set (evaluation), a call with labels returns TokenScores instead, computed chunk
    by chunk over the vocabulary shard (csrc.linear_cross_entropy.linear_token_scores) so no
    [tokens, vocab] logits exist even at 512K tokens; ids at or beyond ``scored_vocab_size``
    (tensor-parallel padding) are never predicted.
    """

    def __init__(self, *args, rotary_base: float, cross_entropy: str = "torch",
                 scored_vocab_size: Optional[int] = None,
                 rope_frequency_scaling: Optional[dict] = None, **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        if cross_entropy not in ("torch", "ours"):
            raise ValueError(f"cross_entropy={cross_entropy!r} must be 'torch' or 'ours' "
                             "(resolve KernelChoices first)")
        if cross_entropy == "ours" and self.config.mtp_num_layers:
            raise ValueError("cross_entropy='ours' does not cover multi-token prediction; "
                             "use cross_entropy='torch' with mtp_num_layers")
        self.cross_entropy = cross_entropy
        self.scored_vocab_size = scored_vocab_size
        self.scoring = False
        self.rotary_pos_emb = PerTokenRotaryEmbedding(self.config.kv_channels, rotary_base,
                                                      rope_frequency_scaling)

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        self.rotary_pos_emb.positions = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self.rotary_pos_emb.positions = None

    def _postprocess(self, hidden_states, *args, labels=None, loss_mask=None,
                     inference_context=None, **kwargs):
        if self.scoring and labels is not None and self.post_process:
            return self._token_scores(hidden_states, labels, loss_mask)
        if (self.cross_entropy == "torch" or labels is None or not self.post_process
                or inference_context is not None):
            return super()._postprocess(hidden_states, *args, labels=labels, loss_mask=loss_mask,
                                        inference_context=inference_context, **kwargs)
        return self._fused_output_loss(hidden_states, labels, loss_mask)

    def _output_shard(self):
        """(this rank's output weight shard, the tensor-parallel group or None)."""
        layer = self.output_layer
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else layer.weight)
        tp_group = layer.tp_group
        tp_size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        return weight, (tp_group if tp_size > 1 else None)

    @torch.no_grad()
    def _token_scores(self, hidden_states, labels, loss_mask) -> TokenScores:
        """Scores of the positions where ``loss_mask`` is nonzero (every position without one);
        the others get loss NaN and argmax -1. Scoring only the answer tokens of a recall
        prompt is what keeps a 512K-token prompt's output layer cheap."""
        weight, tp_group = self._output_shard()
        if self.output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False,
                group=self.output_layer.tp_group)
        seq, batch = hidden_states.shape[:2]
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # s-major, as labels below
        labels = labels.transpose(0, 1).reshape(-1)
        loss = torch.full((seq * batch,), float("nan"), device=hidden.device)
        argmax = torch.full((seq * batch,), -1, dtype=torch.int64, device=hidden.device)
        rows = (torch.arange(seq * batch, device=hidden.device) if loss_mask is None
                else torch.nonzero(loss_mask.transpose(0, 1).reshape(-1)).squeeze(1))
        loss[rows], argmax[rows] = linear_token_scores(
            hidden[rows], weight, labels[rows], tp_group=tp_group,
            vocab_size=self.scored_vocab_size)
        return TokenScores(loss.view(seq, batch).t(), argmax.view(seq, batch).t())

    def _fused_output_loss(self, hidden_states, labels, loss_mask) -> SummedTokenLoss:
        layer = self.output_layer
        weight, scored_group = self._output_shard()
        tp_group = layer.tp_group
        tp_size = 1 if scored_group is None else torch.distributed.get_world_size(tp_group)
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
            tp_group=tp_group if tp_size > 1 else None, impl="ours")
        return SummedTokenLoss(loss_sum, num_tokens)
