"""Build Llama-3 as megatron-core GPTModel chunks for the current rank's place in the layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from engine.model.attention import LlamaGPTModel
from engine.model.config import LlamaConfig
from engine.model.kernels import KernelChoices
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from engine.model.sharding import (
    canonical_init,
    canonical_named_parameters,
    full_shape,
    shard_for_rank,
    tensor_parallel_dim,
)
from engine.model.specs import (
    core_attention_spec,
    llama_block_spec,
    resolved_kernels,
    transformer_engine_available,
)
from engine.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class TrainingPrecision:
    """bf16 on GPU, fp32 on CPU (CPU tests compare layouts within 1e-5 in fp32)."""

    bf16: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def transformer_config(model: LlamaConfig, layout: ParallelLayout,
                       precision: TrainingPrecision = TrainingPrecision(),
                       recompute: Optional[str] = None,
                       kernels: Optional[KernelChoices] = None, **overrides) -> TransformerConfig:
    """megatron-core TransformerConfig for Llama-3 on ``layout``.

    ``recompute``: None, "full" (every layer's activations recomputed in backward) or "selective"
    (only the attention core). ``kernels``: pass the same choices to build_model_chunks.
    """
    on_cpu = not torch.cuda.is_available()
    fields = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=(
            layout.virtual_stages if layout.virtual_stages > 1 else None),
        context_parallel_size=layout.context_parallel,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=precision.dtype,
        pipeline_dtype=precision.dtype,
        bf16=precision.bf16,
        # Token-averaged loss: megatron divides by the global batch's valid tokens.
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
        # Weights are set by canonical_init after construction, identically for every layout.
        perform_initialization=False,
        # Fusions that need apex / CUDA kernels.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        # megatron's MLP calls a spec-supplied activation module (our SwiGLU) only under this flag.
        use_te_activation_func=resolved_kernels(kernels).swiglu == "ours",
        deallocate_pipeline_outputs=not on_cpu,
    )
    if layout.virtual_stages > 1:
        # Interleaving sends activations and gradients both ways between neighbours; with two
        # pipeline ranks "previous" and "next" are the same peer, and batched p2p on one group
        # can pair an activation with a gradient receive. Unbatched p2p keeps the directions
        # on separate groups (Megatron-LM's default for interleaving too).
        fields.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif recompute == "selective":
        fields.update(recompute_granularity="selective")
    elif recompute is not None:
        raise ValueError(f"recompute {recompute!r} must be None, 'full' or 'selective'")
    fields.update(overrides)
    return TransformerConfig(**fields)


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Vocabulary rounded up so every tensor-parallel rank holds an equal shard."""
    return -(-vocab_size // tensor_parallel) * tensor_parallel


def build_model_chunks(model: LlamaConfig, config: TransformerConfig, seed: int = 1234,
                       attention_backend: str = "auto", core_attention=None,
                       use_transformer_engine: Optional[bool] = None,
                       kernels: Optional[KernelChoices] = None,
                       cp_algorithm: str = "all-gather") -> list[LlamaGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialized canonically.

    The full weights are a function of ``seed`` alone, whatever the layout, so runs under
    different layouts can be compared weight for weight. ``core_attention`` (a module or
    ModuleSpec) replaces the document-masked attention, e.g. for context parallelism.
    ``kernels`` picks each kernel (default all "auto"); ``attention_backend`` is the older
    spelling of ``kernels.attention`` and is used when ``kernels`` is None. With
    context_parallel_size > 1 and no ``core_attention``, the context-parallel attention
    ``cp_algorithm`` (engine.parallel.context) fills the slot.
    """
    if kernels is None:
        kernels = KernelChoices(attention=attention_backend)
    elif attention_backend not in ("auto", kernels.attention):
        raise ValueError(f"attention_backend={attention_backend!r} contradicts kernels.attention="
                         f"{kernels.attention!r}; pass only kernels")
    kernels = resolved_kernels(kernels)
    if config.use_te_activation_func != (kernels.swiglu == "ours"):
        raise ValueError(
            f"config.use_te_activation_func={config.use_te_activation_func} but swiglu="
            f"{kernels.swiglu!r}; build the config with transformer_config(..., kernels=...) "
            "using the same kernels as build_model_chunks")
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available() and torch.cuda.is_available()
    if core_attention is None and config.context_parallel_size > 1:
        from engine.parallel.context.module import context_parallel_attention_spec

        core_attention = context_parallel_attention_spec(cp_algorithm, kernels.attention)
    if core_attention is None:
        core_attention = core_attention_spec(kernels.attention)
    layer_kwargs = {"use_transformer_engine": use_transformer_engine,
                    "core_attention": core_attention, "kernels": kernels}
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        spec = llama_block_spec(get_num_layers_to_build(config, vp_stage=stage), **layer_kwargs)
        chunk = LlamaGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(model.vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=not model.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rope_base,
            vp_stage=stage,
            cross_entropy=kernels.cross_entropy,
        )
        initialize_canonically(chunk, model, seed)
        chunks.append(chunk)
    return chunks


@torch.no_grad()
def initialize_canonically(chunk: torch.nn.Module, model: LlamaConfig, seed: int) -> None:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in canonical_named_parameters(chunk):
        shape = full_shape(name, param.shape, tp_size)
        full = canonical_init(name, shape, model.init_method_std, model.num_layers, seed)
        param.copy_(shard_for_rank(name, full, tp_rank, tp_size))
        # megatron sets these only when it initializes weights itself; its grad-norm and
        # checkpoint code read them to tell sharded from replicated parameters.
        dim = tensor_parallel_dim(name)
        set_tensor_model_parallel_attributes(param, is_parallel=dim is not None,
                                             dim=0 if dim is None else dim, stride=1)


def wrap_data_parallel(chunks: list[GPTModel], config: TransformerConfig,
                       distributed_optimizer: bool) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's bucket may be skipped for overlap; irrelevant without it.
            disable_bucketing=index > 0,
        ))
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped
