"""The parallel layout (TP, PP with virtual stages, CP, DP) and its validation.

Everything here is checked before any process group exists, so a layout that cannot work fails
in a second with a message naming the values and the fix, not after a cluster allocation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.model.config import LlamaConfig


class LayoutError(ValueError):
    """A parallel layout that cannot work with the model, data or world size."""


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    data_parallel: int = 1
    # Interleaved 1F1B: model chunks per pipeline rank (1 = plain 1F1B).
    virtual_stages: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    # How attention crosses the CP group: "all-gather" (K/V), "ulysses" (all-to-all over heads)
    # or "transformer-engine" (engine.parallel.context).
    context_parallel_algorithm: str = "all-gather"

    @property
    def world_size(self) -> int:
        return (self.tensor_parallel * self.pipeline_parallel * self.context_parallel
                * self.data_parallel)

    def describe(self) -> str:
        parts = [f"TP{self.tensor_parallel}", f"PP{self.pipeline_parallel}",
                 f"CP{self.context_parallel}", f"DP{self.data_parallel}"]
        if self.virtual_stages > 1:
            parts.append(f"VPP{self.virtual_stages}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("DistOpt")
        if self.context_parallel > 1:
            parts.append(self.context_parallel_algorithm)
        return " x ".join(parts[:4]) + "".join(f" +{p}" for p in parts[4:])

    @classmethod
    def for_world_size(cls, world_size: int, **sizes) -> "ParallelLayout":
        """Derive data_parallel from the world size and the other sizes."""
        model_parallel = (sizes.get("tensor_parallel", 1) * sizes.get("pipeline_parallel", 1)
                          * sizes.get("context_parallel", 1))
        if world_size % model_parallel:
            raise LayoutError(
                f"world size {world_size} is not divisible by TP x PP x CP = {model_parallel}: "
                f"launch a multiple of {model_parallel} processes or shrink the model-parallel sizes"
            )
        return cls(data_parallel=world_size // model_parallel, **sizes)

    def validate(self, model: LlamaConfig, world_size: Optional[int] = None,
                 num_microbatches: Optional[int] = None, seq_length: Optional[int] = None) -> None:
        """Raise LayoutError naming the values and the fix if this layout cannot run.

        ``seq_length`` (tokens), when given, is checked against the context-parallel split.
        """
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel",
                     "data_parallel", "virtual_stages"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} = {getattr(self, name)} must be >= 1")
        tp, pp, vpp = self.tensor_parallel, self.pipeline_parallel, self.virtual_stages
        if world_size is not None and world_size != self.world_size:
            raise LayoutError(
                f"world size {world_size} does not match TP x PP x CP x DP = {tp} x {pp} x "
                f"{self.context_parallel} x {self.data_parallel} = {self.world_size}: launch "
                f"{self.world_size} processes or change the layout"
            )
        if model.num_attention_heads % tp:
            raise LayoutError(
                f"num_attention_heads {model.num_attention_heads} is not divisible by "
                f"tensor_parallel {tp}: choose a tensor_parallel that divides it"
            )
        if model.num_query_groups % tp:
            raise LayoutError(
                f"num_query_groups (KV heads) {model.num_query_groups} is not divisible by "
                f"tensor_parallel {tp}: use tensor_parallel <= {model.num_query_groups} dividing it"
            )
        if model.ffn_hidden_size % tp:
            raise LayoutError(
                f"ffn_hidden_size {model.ffn_hidden_size} is not divisible by tensor_parallel {tp}"
            )
        if model.num_layers % (pp * vpp):
            raise LayoutError(
                f"num_layers {model.num_layers} is not divisible by pipeline_parallel x "
                f"virtual_stages = {pp} x {vpp} = {pp * vpp}: choose sizes whose product divides "
                f"the layer count"
            )
        if vpp > 1 and pp == 1:
            raise LayoutError(
                f"virtual_stages {vpp} needs pipeline_parallel > 1 (interleaving splits a "
                f"pipeline); set virtual_stages = 1 or pipeline_parallel >= 2"
            )
        if vpp > 1 and num_microbatches is not None and num_microbatches % pp:
            raise LayoutError(
                f"interleaved pipeline needs num_microbatches ({num_microbatches}) divisible by "
                f"pipeline_parallel {pp}: change the global or micro batch size"
            )
        if self.sequence_parallel and tp == 1:
            raise LayoutError("sequence_parallel needs tensor_parallel > 1; turn one of them off")
        from engine.parallel.context.chunks import validate_context_parallel

        validate_context_parallel(self.context_parallel, self.context_parallel_algorithm,
                                  seq_length=seq_length,
                                  num_attention_heads=model.num_attention_heads,
                                  num_query_groups=model.num_query_groups, tensor_parallel=tp)
