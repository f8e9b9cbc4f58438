"""Llama-3 model shapes: named configs for 8B and 70B and tiny sizes for tests.

The model definition knows nothing about parallelism; `engine.parallel` decides how it is spread.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

# RoPE scalings the engine implements ("rope_type" in a Hugging Face config.json).
ROPE_SCALING_TYPES = ("llama3",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's frequency-dependent RoPE scaling ("rope_type": "llama3").

    Frequencies whose wavelength is shorter than original_max_position_embeddings /
    high_freq_factor are kept, those longer than original_max_position_embeddings /
    low_freq_factor are divided by ``factor``, and those between are interpolated smoothly.
    Llama-3.1: factor 8, low 1, high 4, original 8192; Llama-3.2: factor 32.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    @classmethod
    def from_dict(cls, values: dict) -> "RopeScaling":
        """From a config's mapping (a model override, a saved model_config, Hugging Face's
        rope_scaling); ValueError naming the key and the fix for anything else."""
        if not isinstance(values, dict):
            raise ValueError(f"rope_scaling {values!r} must be a mapping with rope_type "
                             f"{' or '.join(ROPE_SCALING_TYPES)}, factor, low_freq_factor, "
                             f"high_freq_factor and original_max_position_embeddings")
        kind = values.get("rope_type", values.get("type"))
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not implemented; the engine "
                             f"implements {', '.join(ROPE_SCALING_TYPES)}")
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "rope_type"]
        missing = [name for name in fields if name not in values]
        if missing:
            raise ValueError(f"rope_scaling {kind} lacks {', '.join(missing)}")
        numbers = {}
        for name in fields:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"rope_scaling {name} {value!r} is not a number")
            numbers[name] = value
        scaling = cls(factor=float(numbers["factor"]),
                      low_freq_factor=float(numbers["low_freq_factor"]),
                      high_freq_factor=float(numbers["high_freq_factor"]),
                      original_max_position_embeddings=int(
                          numbers["original_max_position_embeddings"]),
                      rope_type=kind)
        scaling.validate()
        return scaling

    def validate(self) -> None:
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"rope_scaling factor {self.factor} must be a finite number >= 1")
        if not (0 < self.low_freq_factor < self.high_freq_factor
                and math.isfinite(self.high_freq_factor)):
            raise ValueError(f"rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"rope_scaling original_max_position_embeddings "
                             f"{self.original_max_position_embeddings} must be positive")

    def to_dict(self) -> dict:
        """Hugging Face's spelling (rope_type first)."""
        values = dataclasses.asdict(self)
        return {"rope_type": values.pop("rope_type"), **values}

    def describe(self) -> str:
        return (f"{self.rope_type} scaling (factor {self.factor:g}, low/high frequency factors "
                f"{self.low_freq_factor:g}/{self.high_freq_factor:g}, original context "
                f"{self.original_max_position_embeddings})")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-3 decoder. All sizes are counts (layers, heads, features, tokens)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads (GQA)
    ffn_hidden_size: int
    vocab_size: int = 128_256
    rope_base: float = 500_000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    init_method_std: float = 0.02
    # Llama-3 keeps input embedding and output layer separate; Llama-3.2-1B/3B tie them (one
    # matrix, megatron's share_embeddings_and_output_weights).
    untie_embeddings: bool = True
    # None: plain RoPE at rope_base. A RopeScaling (or its mapping, as YAML and saved configs
    # give it): Llama-3.1's frequency scaling on top of rope_base.
    rope_scaling: Optional[RopeScaling] = None
    # The head dimension when it is not hidden_size / num_attention_heads (megatron's name).
    kv_channels: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def describe_rope(self) -> str:
        """Which RoPE the model uses, as a run's plan reports it."""
        scaling = f" with {self.rope_scaling.describe()}" if self.rope_scaling else " (plain)"
        return f"RoPE base {self.rope_base:g}{scaling}"

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def linear_parameters_per_layer(self) -> int:
        """Weights of one decoder layer's matmuls: QKV, attention output, SwiGLU (3 matrices)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        return h * (q + 2 * kv) + q * h + 3 * h * f

    def parameters_per_layer(self) -> int:
        """Every parameter of one decoder layer: its matmuls and its two norms."""
        return self.linear_parameters_per_layer() + 2 * self.hidden_size

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """The vocabulary rounded up so every tensor-parallel rank holds an equal shard."""
        return -(-self.vocab_size // tensor_parallel) * tensor_parallel

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model."""
        embeddings = self.vocab_size * self.hidden_size * (2 if self.untie_embeddings else 1)
        return self.num_layers * self.parameters_per_layer() + embeddings + self.hidden_size

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive whole number")
        if self.kv_channels is not None and (
                isinstance(self.kv_channels, bool) or not isinstance(self.kv_channels, int)
                or self.kv_channels < 2 or self.kv_channels % 2):
            raise ValueError(f"kv_channels {self.kv_channels!r} must be an even positive whole "
                             f"number (RoPE rotates pairs of channels), or None for "
                             f"hidden_size / num_attention_heads")
        for name in ("rope_base", "norm_eps", "init_method_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} {value!r} must be a finite positive number")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base {self.rope_base} must be above 1 (Llama-3: 500000)")
        if not isinstance(self.untie_embeddings, bool):
            raise ValueError(f"untie_embeddings {self.untie_embeddings!r} must be true or false")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise ValueError(f"rope_scaling {self.rope_scaling!r} must be a mapping")
            self.rope_scaling.validate()
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: choose sizes whose ratio is the head dimension, "
                f"or give kv_channels (the head dimension) explicitly"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups} (GQA needs whole query groups)"
            )


MODEL_CONFIGS: dict[str, LlamaConfig] = {
    "llama3-8b": LlamaConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14_336,
    ),
    "llama3-70b": LlamaConfig(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28_672,
    ),
    # Test sizes: every dimension divisible by 2 so TP2/PP2/VPP2 layouts apply.
    "tiny": LlamaConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, vocab_size=512, max_position_embeddings=4096,
    ),
    # Test size for our Triton attention, which takes head dim 64 or 128 (tests run it on CPU
    # through the Triton interpreter, so it is as small as that allows).
    "tiny-hd64": LlamaConfig(
        num_layers=2, hidden_size=128, num_attention_heads=2, num_query_groups=1,
        ffn_hidden_size=128, vocab_size=256, max_position_embeddings=4096,
    ),
    # Quickstart size for the real Llama-3 tokenizer: big enough that the loss visibly falls.
    "tiny-llama3-vocab": LlamaConfig(
        num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=256, max_position_embeddings=16_384,
    ),
}


def get_model_config(name: str, **overrides) -> LlamaConfig:
    """A named config with optional field overrides, validated."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    config = MODEL_CONFIGS[name].replace(**overrides) if overrides else MODEL_CONFIGS[name]
    config.validate()
    return config
