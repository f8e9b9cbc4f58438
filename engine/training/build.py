"""The one build path: a run plan -> megatron TransformerConfig -> this rank's model chunks
(canonically initialized, wrapped in megatron's DDP) -> optimizer and scheduler.

    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    state = build_training_state(plan)        # training, the layout check, memory measurement
    chunks = build_inference_model(plan)      # evaluation, conversion checks: forward only

Training, the layout check, the planner's measurement, conversion verify and evaluation all
build through here, so the kernels, the layout and the precision are given once (in the plan)
and cannot disagree between the config and the modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from engine.device import accelerator, module_to_accelerator, on_accelerator
from engine.megatron_compat import mark_tensor_parallel
from engine.model.config import LlamaConfig
from engine.model.gpt import LlamaGPTModel
from engine.model.sharding import (
    canonical_init,
    canonical_named_parameters,
    full_shape,
    shard_for_rank,
    tensor_parallel_dim,
    tensor_parallel_stride,
)
from engine.model.specs import core_attention_spec, llama_block_spec
from engine.parallel.context.module import context_parallel_attention_spec
from engine.training.run_plan import RunPlan
from engine.training.optimizer import build_optimizer


def transformer_config(plan: RunPlan, **overrides) -> TransformerConfig:
    """megatron-core's TransformerConfig for Llama-3 under ``plan``'s layout, precision,
    recompute and kernels (``overrides``: further TransformerConfig fields, for tests)."""
    model, layout = plan.model, plan.layout
    on_cpu = not on_accelerator()
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
        **layout.megatron_sizes(),
        sequence_parallel=layout.sequence_parallel,
        params_dtype=plan.dtype,
        pipeline_dtype=plan.dtype,
        bf16=plan.bf16,
        # Token-averaged loss: megatron divides by the global batch's valid tokens.
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
        # Weights are set by initialize_canonically after construction, identically for every
        # layout.
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
        use_te_activation_func=plan.kernels.swiglu == "ours",
        deallocate_pipeline_outputs=not on_cpu,
    )
    if layout.virtual_stages > 1:
        # Interleaving sends activations and gradients both ways between neighbours; with two
        # pipeline ranks "previous" and "next" are the same peer, and batched p2p on one group
        # can pair an activation with a gradient receive. Unbatched p2p keeps the directions
        # on separate groups (Megatron-LM's default for interleaving too).
        fields.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if layout.recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif layout.recompute == "selective":
        fields.update(recompute_granularity="selective")
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model_chunks(plan: RunPlan, config: TransformerConfig) -> list[LlamaGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialized canonically: the
    full weights are a function of ``plan.seed`` alone, whatever the layout, so runs under
    different layouts can be compared weight for weight."""
    model, kernels = plan.model, plan.kernels
    if plan.layout.context_parallel > 1:
        core_attention = context_parallel_attention_spec(plan.layout.cp_algorithm,
                                                         kernels.attention)
    else:
        core_attention = core_attention_spec(kernels.attention)
    vpp = plan.layout.virtual_stages
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        spec = llama_block_spec(get_num_layers_to_build(config, vp_stage=stage), kernels,
                                core_attention, plan.use_transformer_engine)
        chunk = LlamaGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.padded_vocab_size(plan.layout.tensor_parallel),
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            share_embeddings_and_output_weights=not model.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rope_base,
            rope_frequency_scaling=model.rope_scaling.to_dict() if model.rope_scaling else None,
            vp_stage=stage,
            cross_entropy=kernels.cross_entropy,
            scored_vocab_size=model.vocab_size,
        )
        # A dry run's device holds no values: computing 8B weights on the host for it would
        # cost minutes and prove nothing.
        initialize_canonically(chunk, model, plan.seed,
                               values=accelerator().type != "meta")
        chunks.append(chunk)
    return chunks


@torch.no_grad()
def initialize_canonically(chunk: torch.nn.Module, model: LlamaConfig, seed: int,
                           values: bool = True) -> None:
    """Set ``chunk``'s weights to this rank's shards of the canonical initialization (with
    ``values``) and mark them tensor-parallel as the engine shards them."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in canonical_named_parameters(chunk):
        if values:
            shape = full_shape(name, param.shape, tp_size)
            full = canonical_init(name, shape, model.init_method_std, model.num_layers, seed)
            param.copy_(shard_for_rank(name, full, tp_rank, tp_size))
        # megatron's grad-norm and checkpoint code read these to tell sharded from replicated
        # parameters; which of them megatron has set already depends on its release.
        mark_tensor_parallel(name, param, tensor_parallel_dim(name), tensor_parallel_stride(name))


def wrap_data_parallel(chunks: list[LlamaGPTModel], config: TransformerConfig,
                       distributed_optimizer: bool, overlap: Optional[bool] = None
                       ) -> list[DistributedDataParallel]:
    """``chunks`` in megatron's DDP. ``overlap`` (default: on a GPU) reduces each gradient
    bucket as soon as backward has filled it, behind the rest of the backward, and with the
    distributed optimizer all-gathers the updated parameters bucket by bucket during the next
    forward (engine.parallel.param_sync), as Megatron-LM's recipes run. On the host both stay
    after the backward and in the optimizer step (the proven CPU path); layout_check --overlap
    runs the GPU path's overlap with gloo to prove it equal."""
    overlap = on_accelerator() if overlap is None else overlap
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and distributed_optimizer,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       # Only the first chunk's bucket may skip overlap.
                                       disable_bucketing=index > 0)
               for index, chunk in enumerate(chunks)]
    if overlap:
        # The schedules hold the reductions back until the last micro-batch's backward (no_sync)
        # and start each chunk's as its backward ends (Megatron-LM's train setup).
        no_sync = [chunk.no_sync for chunk in wrapped]
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(wrapped) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(wrapped) == 1 else grad_sync
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped


def build_model(plan: RunPlan, overlap: Optional[bool] = None) -> list[DistributedDataParallel]:
    """This rank's model chunks for ``plan`` on the accelerator, in megatron's DDP (process
    groups must exist); ``overlap``: see wrap_data_parallel."""
    config = transformer_config(plan)
    # Built and initialized on the host (use_cpu_initialization), then moved once, before DDP
    # sizes its gradient buffers on the parameters' device and the optimizer wraps them.
    chunks = [module_to_accelerator(chunk) for chunk in build_model_chunks(plan, config)]
    return wrap_data_parallel(chunks, config, plan.layout.distributed_optimizer, overlap)


@dataclass
class TrainingState:
    chunks: list  # this rank's DDP-wrapped model chunks
    optimizer: Any  # megatron's (distributed) optimizer
    scheduler: Any  # megatron's OptimizerParamScheduler


def build_inference_model(plan: RunPlan) -> list[LlamaGPTModel]:
    """This rank's model chunks for ``plan`` on the accelerator, for forward passes only
    (evaluation, conversion checks): not wrapped in DDP, so without its gradient buffers, which
    nothing here fills (fp32, twice the bf16 weights: 7.5 GiB a GPU in stage 1's layout at 64K,
    15 GiB in stage 2's at 512K, by the evaluation dry run). Every rank builds the same
    canonical initial weights, so there is nothing to broadcast."""
    config = transformer_config(plan)
    return [module_to_accelerator(chunk) for chunk in build_model_chunks(plan, config)]


def build_training_state(plan: RunPlan, overlap: Optional[bool] = None) -> TrainingState:
    """Model chunks, optimizer and lr schedule for ``plan`` (process groups must exist);
    ``overlap``: see wrap_data_parallel."""
    chunks = build_model(plan, overlap)
    optimizer, scheduler = build_optimizer(
        chunks, plan.optimizer, plan.train_steps, bf16=plan.bf16,
        distributed_optimizer=plan.layout.distributed_optimizer)
    return TrainingState(chunks, optimizer, scheduler)
