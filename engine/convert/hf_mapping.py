"""Engine <-> Hugging Face Llama: the one place that knows how names, shapes and configs map.

Engine names are the canonical ones of ``engine.model.sharding`` (single-process model, global
layer numbers). Per layer:

    engine                                              Hugging Face (model.layers.{i}.)
    decoder.layers.{i}.self_attention.linear_qkv.weight  self_attn.{q,k,v}_proj.weight (grouped)
    decoder.layers.{i}.self_attention.linear_proj.weight self_attn.o_proj.weight
    decoder.layers.{i}.mlp.linear_fc1.weight             mlp.{gate,up}_proj.weight ([gate; up])
    decoder.layers.{i}.mlp.linear_fc2.weight             mlp.down_proj.weight
    decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight  input_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight  post_attention_layernorm.weight

The norms are checkpointed under transformer-engine's names by both layer specs (the local spec
maps its input_layernorm / pre_mlp_layernorm there); checkpoints from before that mapping, which
used the local names, are still read.

plus embedding.word_embeddings.weight <-> model.embed_tokens.weight, decoder.final_layernorm.weight
<-> model.norm.weight and output_layer.weight <-> lm_head.weight (Llama-3 and 3.1 do not tie
them; Llama-3.2-1B/3B do, and then neither side has an output weight of its own).
Both sides rotate half of each head (non-interleaved RoPE), so Q and K need no permutation.
The engine's vocabulary may be padded for tensor-parallel divisibility; the padding rows are
added on import and cut on export.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from data_tools import jsonfile
from engine.model.config import ROPE_SCALING_TYPES, LlamaConfig, RopeScaling
from engine.model.sharding import NORM_CHECKPOINT_PREFIXES, tensor_parallel_dim


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file or tensor and the fix."""


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold one object; ConversionError naming the file and ``fix``."""
    return jsonfile.read_json_object(path, fix, ConversionError)


# Where a checkpoint keeps the two per-layer norm weights.
NORM_LAYOUTS = {
    # The local spec's own module names: checkpoints written before its keys map existed.
    "local": tuple(prefix + "weight" for prefix in NORM_CHECKPOINT_PREFIXES),
    # transformer-engine fuses each norm into the linear that follows it; every spec saves so now.
    "transformer-engine": tuple(prefix + "weight" for prefix in NORM_CHECKPOINT_PREFIXES.values()),
}

CHECKPOINT_NORM_LAYOUT = "transformer-engine"

HF_ARCHITECTURE = "LlamaForCausalLM"
LLAMA3_BOS_ID, LLAMA3_EOS_ID = 128_000, 128_001


# ---------------------------------------------------------------------------------------------
# Tensor transforms
# ---------------------------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             config: LlamaConfig) -> torch.Tensor:
    """[q; k; v] projections -> megatron's linear_qkv, rows grouped per KV group.

    Group g holds its heads_per_group query heads, then its key head, then its value head, so a
    tensor-parallel rank's contiguous row block is whole groups.
    """
    groups, head_dim = config.num_query_groups, config.head_dim
    hidden = q.shape[1]
    q = q.reshape(groups, -1, hidden)  # [groups, heads_per_group x head_dim, hidden]
    k = k.reshape(groups, head_dim, hidden)
    v = v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, config: LlamaConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`: (q_proj, k_proj, v_proj) weights."""
    groups, head_dim = config.num_query_groups, config.head_dim
    per_group_q = config.num_attention_heads // groups * head_dim
    hidden = qkv.shape[1]
    grouped = qkv.reshape(groups, per_group_q + 2 * head_dim, hidden)
    q, k, v = grouped.split([per_group_q, head_dim, head_dim], dim=1)
    return (q.reshape(-1, hidden).contiguous(), k.reshape(-1, hidden).contiguous(),
            v.reshape(-1, hidden).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, config: LlamaConfig) -> tuple[torch.Tensor, ...]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to the padded vocabulary (rows no token id ever selects)."""
    if padded_rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_rows - weight.shape[0], weight.shape[1])])


# ---------------------------------------------------------------------------------------------
# Name mapping
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorMapping:
    """One engine tensor and the Hugging Face tensor(s) it is made of."""

    engine_name: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    # HF tensors -> engine tensor and back; None for a plain copy.
    fuse: Optional[Callable] = None
    split: Optional[Callable] = None
    vocab_rows: bool = False  # dim 0 is the (padded on the engine side) vocabulary

    def to_engine(self, hf_tensors: Sequence[torch.Tensor], config: LlamaConfig,
                  padded_vocab: int) -> torch.Tensor:
        tensor = self.fuse(*hf_tensors, config) if self.fuse else hf_tensors[0]
        return pad_vocab(tensor, padded_vocab) if self.vocab_rows else tensor

    def to_hf(self, engine_tensor: torch.Tensor, config: LlamaConfig) -> tuple[torch.Tensor, ...]:
        if self.vocab_rows:
            engine_tensor = engine_tensor[:config.vocab_size]
        return self.split(engine_tensor, config) if self.split else (engine_tensor,)

    def engine_shape(self, padded_vocab: int) -> tuple[int, ...]:
        rows = sum(shape[0] for shape in self.hf_shapes)
        if self.vocab_rows:
            rows = padded_vocab
        return (rows, *self.hf_shapes[0][1:])


def weight_mappings(config: LlamaConfig,
                    norm_layout: str = CHECKPOINT_NORM_LAYOUT) -> list[TensorMapping]:
    """Every weight of ``config``'s model, in Hugging Face order (embeddings, layers, head)."""
    if norm_layout not in NORM_LAYOUTS:
        raise ConversionError(f"norm layout {norm_layout!r} must be one of {sorted(NORM_LAYOUTS)}")
    input_norm, pre_mlp_norm = NORM_LAYOUTS[norm_layout]
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_query_groups * config.head_dim
    mappings = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                              ((v, h),), vocab_rows=True)]
    for i in range(config.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        mappings += [
            TensorMapping(ours + input_norm, (theirs + "input_layernorm.weight",), ((h,),)),
            TensorMapping(ours + "self_attention.linear_qkv.weight",
                          tuple(theirs + f"self_attn.{p}_proj.weight" for p in "qkv"),
                          ((q_rows, h), (kv_rows, h), (kv_rows, h)), fuse_qkv, split_qkv),
            TensorMapping(ours + "self_attention.linear_proj.weight",
                          (theirs + "self_attn.o_proj.weight",), ((h, q_rows),)),
            TensorMapping(ours + pre_mlp_norm, (theirs + "post_attention_layernorm.weight",),
                          ((h,),)),
            TensorMapping(ours + "mlp.linear_fc1.weight",
                          (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"),
                          ((f, h), (f, h)), fuse_gate_up, split_gate_up),
            TensorMapping(ours + "mlp.linear_fc2.weight", (theirs + "mlp.down_proj.weight",),
                          ((h, f),)),
        ]
    mappings.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",),
                                  ((h,),)))
    if config.untie_embeddings:  # tied: the embedding is the output layer, no lm_head
        mappings.append(TensorMapping("output_layer.weight", ("lm_head.weight",), ((v, h),),
                                      vocab_rows=True))
    for mapping in mappings:
        # Every engine name must be one the sharding rules know, or a layout could not load it.
        tensor_parallel_dim(mapping.engine_name)
    return mappings


_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def checkpoint_key(engine_name: str) -> tuple[str, Optional[int]]:
    """(key in a megatron dist checkpoint, layer index into its leading dim or None).

    megatron stores each per-layer weight once for all layers, stacked along a leading layer
    dimension: ``decoder.layers.3.mlp.linear_fc1.weight`` is row 3 of
    ``decoder.layers.mlp.linear_fc1.weight``.
    """
    match = _LAYER_NAME.match(engine_name)
    if match:
        return f"decoder.layers.{match.group(2)}", int(match.group(1))
    return engine_name, None


def detect_norm_layout(checkpoint_keys) -> str:
    """Which layer spec saved a checkpoint, from the keys its norm weights were stored under."""
    keys = set(checkpoint_keys)
    for layout, (input_norm, _) in NORM_LAYOUTS.items():
        if f"decoder.layers.{input_norm}" in keys:
            return layout
    raise ConversionError(
        "the checkpoint holds no per-layer input norm weight (neither "
        + " nor ".join(f"decoder.layers.{n[0]}" for n in NORM_LAYOUTS.values())
        + "): it was not saved by this engine's Llama model")


# ---------------------------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------------------------

# Why a Hugging Face RoPE scaling the engine does not implement can still be trained.
PLAIN_ROPE_CHOICE = ("or continue with plain RoPE at a new base by passing --rope-base (ProLong "
                     "continues Llama-3-8B with 8e6)")


def _mapping(hf_config: dict, key: str, source: str) -> dict:
    """hf_config[key] as a dict ({} when absent or null); ConversionError for anything else."""
    value = hf_config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConversionError(f"{source}: {key} is {value!r}, not a mapping; Llama configs give "
                              f"it as {{\"rope_type\": ..., ...}} or null")
    return value


def checked_number(value, key: str, source: str, whole: bool = False, minimum: float = 0.0,
            example: str = "") -> float | int:
    """``value`` checked as a (whole) finite number above ``minimum``; ConversionError naming
    the key, the value and the fix otherwise."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and value > minimum and (not whole or value == int(value)))
    if not ok:
        kind = "a whole number" if whole else "a number"
        raise ConversionError(f"{source}: {key} is {value!r}; it must be {kind} above "
                              f"{minimum:g}{f', e.g. {example}' if example else ''}")
    return int(value) if whole else float(value)


def rope_theta_of(hf_config: dict, source: str = "config.json") -> float:
    """RoPE base from a config.json (transformers 4 'rope_theta' or 5 'rope_parameters')."""
    params = _mapping(hf_config, "rope_parameters", source)
    theta = params.get("rope_theta", hf_config.get("rope_theta"))
    if theta is None:
        return 10_000.0
    return checked_number(theta, "rope_theta", source, minimum=1.0, example="500000.0")


def rope_scaling_of(hf_config: dict, source: str = "config.json") -> Optional[dict]:
    """The config's RoPE scaling if it is anything but plain RoPE, else None."""
    scaling = (_mapping(hf_config, "rope_scaling", source)
               or _mapping(hf_config, "rope_parameters", source))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind in (None, "default") else scaling


def llama_config_from_hf(hf_config: dict, source: str,
                         rope_base: Optional[float] = None) -> LlamaConfig:
    """The engine's LlamaConfig for a Hugging Face config.json (``source`` names it in errors).

    RoPE: the config's own (plain, or llama3 scaling, which the engine implements), unless
    ``rope_base`` is given: then plain RoPE at that base, whatever the config's scaling (the
    explicit choice ProLong made). Tied embeddings and an explicit head_dim are carried.
    """
    if not isinstance(hf_config, dict):
        raise ConversionError(f"{source}: holds a {type(hf_config).__name__}, not a JSON object; "
                              f"a Hugging Face config.json is one object of settings")
    if hf_config.get("model_type") != "llama":
        raise ConversionError(
            f"{source}: model_type is {hf_config.get('model_type')!r}, not 'llama': only Llama "
            f"checkpoints (LlamaForCausalLM) can be imported")
    missing = [key for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if key not in hf_config]
    if missing:
        raise ConversionError(f"{source}: missing {', '.join(missing)}; a Llama config.json "
                              f"defines them")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise ConversionError(f"{source}: {key} is true; Llama-3 has no biases and the "
                                  f"engine's model has none")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not silu "
                              f"(the engine's SwiGLU)")
    sizes = {key: checked_number(hf_config[key], key, source, whole=True, example="64")
             for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "vocab_size")}
    heads = sizes["num_attention_heads"]
    groups = hf_config.get("num_key_value_heads")
    groups = heads if groups is None else checked_number(groups, "num_key_value_heads", source,
                                                  whole=True, example=str(heads))
    max_positions = checked_number(hf_config.get("max_position_embeddings", 8192),
                            "max_position_embeddings", source, whole=True, example="8192")
    norm_eps = checked_number(hf_config.get("rms_norm_eps", 1e-5), "rms_norm_eps", source,
                       example="1e-05")
    init_std = checked_number(hf_config.get("initializer_range", 0.02), "initializer_range", source,
                       example="0.02")
    tied = hf_config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConversionError(f"{source}: tie_word_embeddings is {tied!r}; it must be true or "
                              f"false")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None:
        head_dim = checked_number(head_dim, "head_dim", source, whole=True, example="128")
    derived = sizes["hidden_size"] // heads if sizes["hidden_size"] % heads == 0 else None
    theta = rope_theta_of(hf_config, source)
    scaling = rope_scaling_of(hf_config, source)
    if rope_base is not None:
        theta, rope_scaling = float(rope_base), None
    elif scaling is None:
        rope_scaling = None
    else:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_SCALING_TYPES:
            raise ConversionError(
                f"{source}: RoPE scaling type {kind!r} is not implemented by the engine, which "
                f"implements plain RoPE and {', '.join(ROPE_SCALING_TYPES)} scaling: implement "
                f"{kind!r} in csrc.rope (reference.py) and engine.model.config, {PLAIN_ROPE_CHOICE}")
        try:
            rope_scaling = RopeScaling.from_dict(scaling)
        except ValueError as error:
            raise ConversionError(f"{source}: {error}; fix config.json's RoPE scaling, "
                                  f"{PLAIN_ROPE_CHOICE}") from None
    config = LlamaConfig(
        num_layers=sizes["num_hidden_layers"],
        hidden_size=sizes["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=sizes["intermediate_size"],
        vocab_size=sizes["vocab_size"],
        rope_base=theta,
        max_position_embeddings=max_positions,
        norm_eps=norm_eps,
        init_method_std=init_std,
        untie_embeddings=not tied,
        rope_scaling=rope_scaling,
        kv_channels=head_dim if head_dim is not None and head_dim != derived else None,
    )
    try:
        config.validate()
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from None
    return config


def hf_config_from_llama(config: LlamaConfig, dtype: torch.dtype, bos_token_id, eos_token_id,
                         extra: Optional[dict] = None) -> dict:
    """config.json for a LlamaForCausalLM of ``config``'s shape.

    Both spellings of the RoPE base and scaling are written: 'rope_theta' and 'rope_scaling'
    (transformers 4, the published Llama-3.1 configs) and 'rope_parameters' (transformers 5).
    """
    scaling = config.rope_scaling.to_dict() if config.rope_scaling else {"rope_type": "default"}
    hf = dict(extra or {})
    hf.update(
        architectures=[HF_ARCHITECTURE],
        model_type="llama",
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        rope_parameters={**scaling, "rope_theta": config.rope_base},
        rope_scaling=scaling if config.rope_scaling else None,
        vocab_size=config.vocab_size,
        tie_word_embeddings=not config.untie_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        initializer_range=config.init_method_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
        dtype=str(dtype).removeprefix("torch."),
        use_cache=True,
    )
    return hf
