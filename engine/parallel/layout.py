"""The parallel layout (TP, PP with virtual stages, CP with its algorithm, DP, SP, recompute) and
its validation: the one description of how a model is spread over GPUs.

The training config, megatron's process groups and TransformerConfig, the memory planner,
checkpoints and the Hugging Face importer all take this object. Everything here is checked before
any process group exists, so a layout that cannot work fails in a second with a message naming
the values and the fix, not after a cluster allocation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from engine.model.config import LlamaConfig

# How attention crosses the CP group (engine.parallel.context): all-gather of K/V (Llama 3) or
# the Ulysses all-to-all over heads (ProLong).
CP_ALGORITHMS = ("all-gather", "ulysses")
# Activation recompute: none, only the attention core ("selective"), or every layer ("full").
RECOMPUTE_MODES = ("none", "selective", "full")


class LayoutError(ValueError):
    """A parallel layout that cannot work with the model, data or world size."""


def check_sequence_split(seq_length: int, context_parallel: int) -> int:
    """Tokens per load-balance chunk (seq_length / (2 x CP)); LayoutError if it does not divide."""
    chunks = 2 * context_parallel
    if seq_length % chunks:
        raise LayoutError(
            f"seq_length {seq_length} is not divisible by 2 x context_parallel_size = {chunks}: "
            f"use a seq_length that is a multiple of {chunks} (e.g. "
            f"{-(-seq_length // chunks) * chunks}) or a smaller context_parallel_size")
    return seq_length // chunks


@dataclass(frozen=True)
class ParallelLayout:
    """How a run splits its model and data over its processes: the config's ``parallel:``
    section. data_parallel is never set: it is the number of processes divided by
    TP x PP x CP (``with_world_size``). Each field is checked when the layout is made;
    ``validate`` checks it against a model, world size and batch."""

    tensor_parallel: int = 1  # TP: each layer's weights split over this many GPUs
    pipeline_parallel: int = 1  # PP: the layers split into this many stages (1F1B)
    context_parallel: int = 1  # CP: each sequence split over this many GPUs
    data_parallel: int = 1  # DP: derived from the world size, never set in a config
    # Interleaved 1F1B: model chunks per pipeline rank (1 = plain 1F1B).
    virtual_stages: int = 1
    sequence_parallel: bool = False  # SP: norms and dropout split over the TP group (needs TP > 1)
    # Optimizer state sharded over the data x context parallel ranks.
    distributed_optimizer: bool = False
    # How attention crosses the CP group: all-gather of K/V (Llama 3) or the Ulysses all-to-all
    # over heads (ProLong).
    cp_algorithm: str = "all-gather"
    # Activation recompute: none, the attention core only ("selective"), or every layer ("full").
    recompute: str = "none"

    CHOICES = {"cp_algorithm": CP_ALGORITHMS, "recompute": RECOMPUTE_MODES}
    # (lowest, exclusive) per field, as the config's sections declare their ranges;
    # __post_init__ enforces them.
    RANGES = {name: (1, False) for name in ("tensor_parallel", "pipeline_parallel",
                                            "context_parallel", "data_parallel", "virtual_stages")}
    # Not a setting of the config: the world size divided by the model-parallel sizes.
    DERIVED = ("data_parallel",)

    def __post_init__(self):
        # Messages start with the field's name: the config prefixes its section ("parallel.").
        for name, (lowest, _) in self.RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise LayoutError(f"{name} = {value!r} must be an integer >= {lowest}")
        for name in ("sequence_parallel", "distributed_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise LayoutError(f"{name} = {getattr(self, name)!r} must be true or false")
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LayoutError(f"{name} {getattr(self, name)!r} is not one of {allowed}")

    @property
    def world_size(self) -> int:
        return (self.tensor_parallel * self.pipeline_parallel * self.context_parallel
                * self.data_parallel)

    @classmethod
    def for_world_size(cls, world_size: int, **settings) -> "ParallelLayout":
        """The layout of ``settings`` with data_parallel derived from the world size."""
        return cls(**settings).with_world_size(world_size)

    def with_world_size(self, world_size: int) -> "ParallelLayout":
        """This layout with data_parallel derived from the world size and the other sizes."""
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % model_parallel:
            raise LayoutError(
                f"world size {world_size} is not divisible by TP x PP x CP = {model_parallel}: "
                f"launch a multiple of {model_parallel} processes or shrink the model-parallel sizes"
            )
        return dataclasses.replace(self, data_parallel=world_size // model_parallel)

    def describe(self) -> str:
        """E.g. "TP2 x PP2 x CP2 x DP1 +SP +ulysses +recompute=full"."""
        sizes = (f"TP{self.tensor_parallel} x PP{self.pipeline_parallel} x "
                 f"CP{self.context_parallel} x DP{self.data_parallel}")
        extras = []
        if self.virtual_stages > 1:
            extras.append(f"VPP{self.virtual_stages}")
        if self.sequence_parallel:
            extras.append("SP")
        if self.distributed_optimizer:
            extras.append("DistOpt")
        if self.context_parallel > 1:
            extras.append(self.cp_algorithm)
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}")
        return sizes + "".join(f" +{extra}" for extra in extras)

    def megatron_sizes(self) -> dict:
        """The sizes as megatron names them, for both initialize_model_parallel and
        TransformerConfig (the one mapping of this layout onto megatron)."""
        return {
            "tensor_model_parallel_size": self.tensor_parallel,
            "pipeline_model_parallel_size": self.pipeline_parallel,
            "virtual_pipeline_model_parallel_size": (
                self.virtual_stages if self.virtual_stages > 1 else None),
            "context_parallel_size": self.context_parallel,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ParallelLayout":
        """From to_dict(); unknown keys are ignored, missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def validate(self, model: LlamaConfig, *, world_size: Optional[int] = None,
                 num_microbatches: Optional[int] = None,
                 seq_length: Optional[int] = None) -> None:
        """Raise LayoutError naming the values and the fix if this layout cannot run ``model``.

        ``seq_length`` (tokens), when given, is checked against the context-parallel split;
        ``num_microbatches`` against the interleaved pipeline. Each field alone was checked
        when the layout was made.
        """
        tp, pp, vpp, cp = (self.tensor_parallel, self.pipeline_parallel, self.virtual_stages,
                           self.context_parallel)
        if world_size is not None and world_size != self.world_size:
            raise LayoutError(
                f"world size {world_size} does not match TP x PP x CP x DP = {tp} x {pp} x "
                f"{cp} x {self.data_parallel} = {self.world_size}: launch "
                f"{self.world_size} processes or change the layout")
        if model.num_attention_heads % tp:
            raise LayoutError(
                f"num_attention_heads {model.num_attention_heads} is not divisible by "
                f"tensor_parallel {tp}: choose a tensor_parallel that divides it")
        if model.num_query_groups % tp:
            raise LayoutError(
                f"num_query_groups (KV heads) {model.num_query_groups} is not divisible by "
                f"tensor_parallel {tp}: use tensor_parallel <= {model.num_query_groups} dividing it")
        if model.ffn_hidden_size % tp:
            raise LayoutError(
                f"ffn_hidden_size {model.ffn_hidden_size} is not divisible by tensor_parallel {tp}")
        if model.num_layers % (pp * vpp):
            raise LayoutError(
                f"num_layers {model.num_layers} is not divisible by pipeline_parallel x "
                f"virtual_stages = {pp} x {vpp} = {pp * vpp}: choose sizes whose product divides "
                f"the layer count")
        if vpp > 1 and pp == 1:
            raise LayoutError(
                f"virtual_stages {vpp} needs pipeline_parallel > 1 (interleaving splits a "
                f"pipeline); set virtual_stages = 1 or pipeline_parallel >= 2")
        if vpp > 1 and num_microbatches is not None and num_microbatches % pp:
            raise LayoutError(
                f"interleaved pipeline needs num_microbatches ({num_microbatches}) divisible by "
                f"pipeline_parallel {pp}: change the global or micro batch size")
        if self.sequence_parallel and tp == 1:
            raise LayoutError("sequence_parallel needs tensor_parallel > 1; turn one of them off")
        if cp > 1 and seq_length is not None:
            check_sequence_split(seq_length, cp)
        if self.sequence_parallel and seq_length is not None and (seq_length // cp) % tp:
            raise LayoutError(
                f"sequence parallelism splits each rank's {seq_length // cp} tokens (seq_length "
                f"{seq_length} / context_parallel {cp}) over tensor_parallel {tp}, which does "
                f"not divide them: use a seq_length that is a multiple of {cp * tp}")
        if cp > 1 and self.cp_algorithm == "ulysses":
            local_heads = model.num_attention_heads // tp
            if local_heads % cp:
                allowed = [c for c in range(1, local_heads + 1) if local_heads % c == 0]
                raise LayoutError(
                    f"Ulysses context parallelism splits attention heads: the {local_heads} "
                    f"query heads per tensor-parallel rank (num_attention_heads "
                    f"{model.num_attention_heads} / tensor_parallel {tp}) are not divisible by "
                    f"context_parallel_size {cp}; use context_parallel_size in {allowed} or "
                    f"cp_algorithm all-gather")
            # KV heads fewer than CP are repeated (ProLong repeats 8 -> 32): they do not bound CP.
