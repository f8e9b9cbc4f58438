"""megatron-core layer specs for Llama-3: which module fills each slot of a transformer layer.

Slots (norms, core attention, linears) are swapped here rather than by forking megatron's modules:
our RMSNorm (sequence-parallel aware) everywhere a norm goes, and the core attention chosen by
the caller. Transformer-engine's fused modules are used when it is installed and asked for.
Resolved KernelChoices (engine.model.kernel_choices) pick the kernel behind each slot: the norms'
impl, RoPE (megatron's SelfAttention or RotaryKernelSelfAttention), the MLP activation
(megatron's gated silu or our SwiGLU module) and the core attention backend. The core attention
spec may also come from above (context parallelism fills the same slot).
"""
from __future__ import annotations

import importlib.util

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from engine.model.attention import (
    DocumentMaskedAttention,
    RotaryKernelSelfAttention,
    TransformerEngineDocumentAttention,
)
from engine.model.kernel_choices import KernelChoices
from engine.model.norm import RMSNorm
from engine.model.sharding import NORM_CHECKPOINT_PREFIXES
from engine.model.swiglu import SwiGLU


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def core_attention_spec(backend: str) -> ModuleSpec:
    """The core-attention slot for a resolved KernelChoices.attention, one CP rank."""
    if backend == "transformer-engine":
        return ModuleSpec(module=TransformerEngineDocumentAttention)
    return ModuleSpec(module=DocumentMaskedAttention, params={"backend": backend})


def llama_layer_spec(kernels: KernelChoices, core_attention: ModuleSpec,
                     use_transformer_engine: bool = False) -> ModuleSpec:
    """The spec of one Llama-3 decoder layer.

    ``kernels`` (resolved) picks norm, RoPE and activation kernels; ``core_attention`` computes
    softmax(QK^T)V given projected, rotated Q/K/V (core_attention_spec, or context parallelism's).
    The projections and output projection stay megatron's.
    """
    if not kernels.resolved:
        raise ValueError(f"llama_layer_spec needs resolved kernels, got {kernels.describe()}")
    norm = ModuleSpec(module=RMSNorm, params={"impl": kernels.rmsnorm})
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        # TE fuses the pre-attention and pre-MLP norms into the following linear.
        qkv, fc1, proj, fc2 = (TELayerNormColumnParallelLinear, TELayerNormColumnParallelLinear,
                               TERowParallelLinear, TERowParallelLinear)
        input_norm = pre_mlp_norm = IdentityOp
        checkpoint_keys_map = {}
    else:
        qkv, fc1, proj, fc2 = (ColumnParallelLinear, ColumnParallelLinear,
                               RowParallelLinear, RowParallelLinear)
        input_norm = pre_mlp_norm = norm
        # Checkpoints store the norms under transformer-engine's names (the norm fused into the
        # next linear), as megatron's own local spec does: a checkpoint saved by either spec
        # loads into the other, e.g. weights imported on a CPU node into a TE run on GPUs.
        checkpoint_keys_map = dict(NORM_CHECKPOINT_PREFIXES)

    attention_params = {"attn_mask_type": AttnMaskType.causal}
    attention_module = SelfAttention
    if kernels.rope == "ours":
        attention_module = RotaryKernelSelfAttention
        attention_params["rope_impl"] = kernels.rope
    # Read by megatron's MLP only when config.use_te_activation_func (the engine's
    # TransformerConfig sets it exactly when swiglu is ours); otherwise it applies silu itself.
    activation = (ModuleSpec(module=SwiGLU, params={"impl": kernels.swiglu})
                  if kernels.swiglu == "ours" else None)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=attention_module,
                params=attention_params,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=fc1, linear_fc2=fc2, activation_func=activation)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=checkpoint_keys_map,
        ),
    )


def llama_block_spec(num_layers_on_stage: int, kernels: KernelChoices,
                     core_attention: ModuleSpec,
                     use_transformer_engine: bool = False) -> TransformerBlockSubmodules:
    """Block spec for the layers one pipeline stage (or virtual stage) builds.

    Passing the block explicitly keeps megatron from choosing its own final norm, which under
    sequence parallelism would be the torch norm that refuses it.
    """
    layer = llama_layer_spec(kernels, core_attention, use_transformer_engine)
    final_norm = ModuleSpec(module=RMSNorm, params={"impl": kernels.rmsnorm})
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_on_stage,
                                      layer_norm=final_norm)
