"""Llama-3 model shapes: named configs for 8B and 70B and tiny sizes for tests.

The model definition knows nothing about parallelism; `engine.parallel` decides how it is spread.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


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
    # Llama-3 keeps input embedding and output layer separate.
    untie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def linear_parameters_per_layer(self) -> int:
        """Weights of one decoder layer's matmuls: QKV, attention output, SwiGLU (3 matrices)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        kv = self.num_query_groups * self.head_dim
        return h * (h + 2 * kv) + h * h + 3 * h * f

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
        self._check_field_values()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: choose sizes whose ratio is the head dimension"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups} (GQA needs whole query groups)"
            )

    def _check_field_values(self) -> None:
        """Types and ranges of the shape fields, before any arithmetic on them: an override
        such as num_attention_heads=0 or rope_base=abc would otherwise fail deep in the model
        build, after the process group exists."""
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive whole number")
        for name in _POSITIVE_NUMBER_FIELDS:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} {value!r} must be a finite positive number")
        if not isinstance(self.untie_embeddings, bool):
            raise ValueError(f"untie_embeddings {self.untie_embeddings!r} must be true or false")


_COUNT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "vocab_size", "max_position_embeddings")
_POSITIVE_NUMBER_FIELDS = ("rope_base", "norm_eps", "init_method_std")


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
