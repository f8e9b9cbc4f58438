"""How each Llama-3 weight is split over tensor-parallel ranks: the one place that knows it.

Canonical names and shapes are those of the single-process model (TP1, PP1): layers are numbered
globally, ``linear_qkv`` rows are grouped per KV group as [q x heads_per_group, k, v], and
``linear_fc1`` is [gate; up]. Initialization, weight gathering and Hugging Face conversion all go
through these functions, so a layout never disagrees with another about what a weight means.
"""
from __future__ import annotations

import re
import zlib
from typing import Iterator, Sequence

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
# The one matrix of tied embeddings (input embedding and output layer).
TIED_EMBEDDING = "embedding.word_embeddings.weight"

# Checkpoint key prefixes of the two per-layer norms: the local spec's module -> the name
# transformer-engine's fused norm-linear gives it, which every layer spec checkpoints under.
NORM_CHECKPOINT_PREFIXES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

# Split along dim 0 into contiguous blocks (column-parallel outputs, vocabulary shards).
_ROW_SHARDED = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
# Split along dim 1 (row-parallel inputs).
_COL_SHARDED = ("linear_proj.weight", "linear_fc2.weight")
# Two stacked halves, each split along dim 0: a rank holds [gate_r; up_r].
_GATE_UP_SHARDED = ("linear_fc1.weight",)


def _sharding_of(name: str) -> str:
    if name.endswith(_GATE_UP_SHARDED):
        return "gate_up"
    if name.endswith(_ROW_SHARDED):
        return "rows"
    if name.endswith(_COL_SHARDED):
        return "cols"
    if name.endswith("layernorm.weight") or name.endswith("layer_norm_weight"):
        return "replicated"
    raise KeyError(f"no tensor-parallel rule for parameter {name!r}")


def shard_for_rank(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of canonical tensor ``full`` that tensor-parallel rank ``tp_rank`` holds."""
    kind = _sharding_of(name)
    if kind == "replicated" or tp_size == 1:
        return full
    if kind == "rows":
        return full.chunk(tp_size, dim=0)[tp_rank]
    if kind == "cols":
        return full.chunk(tp_size, dim=1)[tp_rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])


def merge_shards(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_for_rank`: the canonical tensor from all TP ranks' shards."""
    kind = _sharding_of(name)
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "rows":
        return torch.cat(list(shards), dim=0)
    if kind == "cols":
        return torch.cat(list(shards), dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def tensor_parallel_dim(name: str):
    """The dimension a parameter is split along over TP ranks, or None if replicated."""
    return {"rows": 0, "gate_up": 0, "cols": 1, "replicated": None}[_sharding_of(name)]


def tensor_parallel_stride(name: str) -> int:
    """megatron's ``partition_stride`` of a parameter: 2 for [gate; up], whose halves are each
    split (megatron's MLP says the same of its fused fc1), 1 for every other parameter."""
    return 2 if _sharding_of(name) == "gate_up" else 1


def full_shape(name: str, local_shape: torch.Size, tp_size: int) -> torch.Size:
    kind = _sharding_of(name)
    shape = list(local_shape)
    if kind in ("rows", "gate_up"):
        shape[0] *= tp_size
    elif kind == "cols":
        shape[1] *= tp_size
    return torch.Size(shape)


def canonical_named_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for every parameter of one model chunk.

    Local layer indices (``decoder.layers.0`` on every pipeline stage) become global ones, read
    from each megatron TransformerLayer's 1-based ``layer_number``. With tied embeddings the last
    pipeline stage's copy of the embedding (megatron's ``output_layer.weight`` there, kept equal
    to the first stage's by megatron) is named as the one matrix it is,
    ``embedding.word_embeddings.weight``.
    """
    model = getattr(module, "module", module)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    global_index = {}
    for mod_name, mod in module.named_modules():
        match = re.search(r"decoder\.layers\.(\d+)$", mod_name)
        if match and hasattr(mod, "layer_number"):
            global_index[match.group(1)] = mod.layer_number - 1
    for name, param in module.named_parameters():
        name = name.removeprefix("module.")
        name = _LAYER.sub(lambda m: f"decoder.layers.{global_index[m.group(1)]}.", name)
        if tied and name == "output_layer.weight":
            name = TIED_EMBEDDING
        yield name, param


def init_std(name: str, std: float, num_layers: int) -> float:
    """megatron's init: N(0, std), with std / sqrt(2 x layers) for outputs added to the residual."""
    if name.endswith(_COL_SHARDED):
        return std / (2.0 * num_layers) ** 0.5
    return std


def canonical_init(name: str, shape: torch.Size, std: float, num_layers: int,
                   seed: int) -> torch.Tensor:
    """The full fp32 initial value of a parameter, a function of (seed, name) alone."""
    if _sharding_of(name) == "replicated":
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, init_std(name, std, num_layers), generator=generator)
