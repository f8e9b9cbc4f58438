"""Per-GPU memory of a Llama-3 training layout: weights, gradients, optimizer, activations,
logits and communication buffers, in bytes.

The model follows what this engine runs: megatron-core with bf16 weights, fp32 main gradients
(grad_reduce_in_fp32), the distributed optimizer (fp32 master weights and Adam moments sharded
over the data x context parallel ranks), FlashAttention-style attention that keeps only
Q, K, V, output and the log-sum-exp (never a seq x seq score matrix), 1F1B pipelining (the first
stage holds PP micro-batches in flight, i.e. all layers' activations of one micro-batch), and
context parallelism splitting every activation over CP.

Activation bytes saved per layer per token, in elements (Korthikanti et al. 2022 recounted for
Llama: RMSNorm, GQA, SwiGLU, no dropout), with h hidden, g = KV heads x head_dim, f = FFN size:
  norms and their outputs (4h; split over TP only with sequence parallelism),
  Q, K, V (h + 2g) and the attention output (h),
  SwiGLU input (2f) and output (f)                      -> all split over TP.
Recompute "selective" recomputes the core attention (drops its internal copies: all-gathered
K/V or the Ulysses head-sharded sequence); "full" keeps only each layer's input (and the RoPE
angles its checkpoint is given) and recomputes one layer at a time in backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from csrc.linear_cross_entropy import default_chunk_size
from engine.model.config import LlamaConfig
from engine.parallel.layout import RECOMPUTE_MODES, LayoutError, ParallelLayout

GIB = 1024 ** 3
# Allocator fragmentation, CUDA context and library workspaces: a layout fits when its total
# stays below this share of the GPU memory.
USABLE_FRACTION = 0.9
# megatron DDP gradient buckets (fp32) in flight: max(40M, 1M x DP) elements, see
# megatron.core.distributed.DistributedDataParallelConfig.bucket_size.
DDP_BUCKET_ELEMENTS = 40_000_000


@dataclass(frozen=True)
class Workload:
    seq_length: int  # tokens per sequence
    micro_batch: int = 1  # sequences per micro-batch
    weight_bytes: int = 2  # bf16 weights and activations (4 for the fp32 CPU runs)
    fused_cross_entropy: bool = True  # chunked linear + CE: logits never materialized whole
    kernels: str = "fused"  # activation profile, see activation_elements_per_token


@dataclass
class MemoryBreakdown:
    """Bytes per GPU on the most loaded pipeline stage."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    communication: float
    parameters: int = 0  # parameters on this GPU
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.communication)

    def as_gib(self) -> dict:
        return {k: getattr(self, k) / GIB for k in
                ("weights", "gradients", "optimizer", "activations", "logits", "communication",
                 "total")}


def stage_parameters(model: LlamaConfig, layout: ParallelLayout) -> int:
    """Parameters per GPU on the heaviest pipeline stage (embedding or output layer + layers)."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    vocab = model.padded_vocab_size(tp)
    layers = model.num_layers // pp
    h = model.hidden_size
    # Norm weights are replicated over TP; everything else is split.
    norms = layers * 2 * h + h
    split = layers * model.linear_parameters_per_layer()
    embedding = vocab * h
    if pp == 1:
        split += embedding * (2 if model.untie_embeddings else 1)
    else:
        split += embedding  # the first stage's embedding or the last stage's output layer
    return split // tp + norms


def activation_elements_per_token(model: LlamaConfig, layout: ParallelLayout,
                                  kernels: str = "fused") -> dict:
    """Elements saved for backward per token per layer: what SP splits ("norms") and what TP
    splits ("attention_mlp").

    "fused" (GPU: our RMSNorm, RoPE, SwiGLU kernels, flash attention): each norm keeps its input
    and output (2h); attention keeps the QKV projection output (V is a view of it, h + 2g), the
    rotated Q and K (h + g) and its output (h); SwiGLU keeps its input (2f) and output (f).
    "unfused" (megatron/torch modules, the CPU path; measured by engine.planner.measure): norms
    also keep the normalized tensor (3h each), RoPE keeps cos/sin per layer (4 x head_dim), and
    megatron's gated silu keeps 5f (input 2f, gate, silu, product).
    """
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    g = model.num_query_groups * d
    tp = layout.tensor_parallel
    sp_split = tp if layout.sequence_parallel and tp > 1 else 1
    if kernels == "fused":
        norms, attention, mlp, rope = 4 * h, (h + 2 * g) + (h + g) + h, 3 * f, 0
    elif kernels == "unfused":
        norms, attention, mlp, rope = 6 * h, (h + 2 * g) + (h + g) + h, 5 * f, 4 * d
    else:
        raise ValueError(f"kernels {kernels!r} must be 'fused' or 'unfused'")
    return {"norms": norms / sp_split, "attention_mlp": (attention + mlp) / tp + rope}


def cp_attention_extra_elements(model: LlamaConfig, layout: ParallelLayout, tokens_local: int) -> float:
    """Elements the CP attention keeps beyond this rank's Q/K/V/output, per layer."""
    cp, tp = layout.context_parallel, layout.tensor_parallel
    if cp == 1:
        return 0.0
    g = model.num_query_groups * model.head_dim / tp
    if layout.cp_algorithm == "all-gather":
        # K and V of the whole sequence, kept for the attention backward (the rank-ordered
        # gathered buffer is freed once reordered).
        return 2 * g * tokens_local * cp
    # Ulysses: the full-sequence, head-sharded Q/K/V/output (KV heads repeated to >= CP).
    kv_repeated = math.lcm(model.num_query_groups // tp, cp) * model.head_dim
    return tokens_local * (2 * model.hidden_size / tp + 2 * kv_repeated)


def activation_elements(model: LlamaConfig, layout: ParallelLayout, work: Workload) -> tuple[float, float]:
    """(elements the decoder saves in forward, extra elements live while backward recomputes
    plus the final norm's output, which the output layer keeps).

    1F1B: the first stage holds PP micro-batches of L / PP layers, i.e. one micro-batch of all
    L layers, whatever PP is. Besides its layers the decoder keeps the final norm's input (and,
    unfused, its normalized tensor); under full recompute every layer's checkpoint also keeps
    the RoPE angles it was given, one fp32 [tokens, head_dim] table that all layers share
    (engine.planner.measure counts each of these tensors).
    """
    tokens = work.seq_length * work.micro_batch // layout.context_parallel
    per_token = activation_elements_per_token(model, layout, work.kernels)
    layer_full = tokens * (per_token["norms"] + per_token["attention_mlp"])
    extra = cp_attention_extra_elements(model, layout, tokens)
    h_local = model.hidden_size / (
        layout.tensor_parallel if layout.sequence_parallel and layout.tensor_parallel > 1 else 1)
    layers = model.num_layers
    final_norm = tokens * h_local * (2 if work.kernels == "unfused" else 1)
    if layout.recompute == "none":
        saved, transient = layers * (layer_full + extra), 0.0
    elif layout.recompute == "selective":
        # The core attention is recomputed: its CP copies live for one layer at a time.
        saved, transient = layers * layer_full, extra
    else:
        # Each layer's input; backward recomputes one layer in full at a time.
        rope_angles = tokens * model.head_dim * 4 / work.weight_bytes  # fp32, in activation width
        saved, transient = layers * tokens * h_local + rope_angles, layer_full + extra
    return saved + final_norm, transient + tokens * h_local


def estimate_memory(model: LlamaConfig, layout: ParallelLayout, work: Workload) -> MemoryBreakdown:
    """Predicted peak bytes per GPU for one training step."""
    tp, pp, cp, dp = (layout.tensor_parallel, layout.pipeline_parallel,
                      layout.context_parallel, layout.data_parallel)
    params = stage_parameters(model, layout)
    wb = work.weight_bytes
    weights = params * wb
    gradients = params * 4  # fp32 main gradients
    # fp32 master copy (only when weights are 16-bit) + Adam m and v.
    optimizer_per_param = (4 if wb < 4 else 0) + 8
    shards = dp * cp if layout.distributed_optimizer else 1
    optimizer = params * optimizer_per_param / shards

    tokens = work.seq_length * work.micro_batch // cp  # this rank's tokens of one micro-batch
    saved, transient = activation_elements(model, layout, work)
    activations = (saved + transient) * wb
    h_local = model.hidden_size / (tp if layout.sequence_parallel and tp > 1 else 1)

    vocab_local = model.padded_vocab_size(tp) // tp
    if work.fused_cross_entropy:
        # csrc.linear_cross_entropy: one chunk of fp32 logits and its gradient at a time.
        chunk = min(tokens, default_chunk_size(tokens, model.hidden_size, vocab_local))
        logits = 2 * chunk * vocab_local * 4
    else:
        # Output layer logits (weight dtype) + fp32 softmax kept for backward.
        logits = tokens * vocab_local * (wb + 4)

    g = model.num_query_groups * model.head_dim / tp
    comm = min(DDP_BUCKET_ELEMENTS, params) * 4  # gradient bucket being reduced
    if cp > 1 and layout.cp_algorithm == "all-gather":
        comm += 2 * (2 * g * tokens * cp) * wb  # gathered K/V and its gradient, one layer
    elif cp > 1:
        comm += 2 * tokens * (2 * model.hidden_size / tp + 2 * g) * wb  # all-to-all buffers
    if tp > 1 and layout.sequence_parallel:
        comm += tokens * model.hidden_size * wb  # sequence-parallel all-gather
    if pp > 1:
        comm += 2 * tokens * h_local * wb  # p2p send / receive
    # Under recompute the output layer's logits (end of the forward, start of the backward) and
    # the layer the backward recomputes (later) are never live together: the peak holds the
    # larger of the two, not both (the dry run, engine.dryrun, sees exactly that).
    activations -= min(transient * wb, logits)
    return MemoryBreakdown(weights, gradients, optimizer, activations, logits, comm,
                           parameters=params)


def candidate_layouts(model: LlamaConfig, gpus: int, seq_length: int, cp_algorithms,
                      gpus_per_node: int = 8):
    """Every layout (powers of two, TP within a node, SP with TP, the distributed optimizer)
    with each recompute mode and CP algorithm that the engine accepts for ``gpus``."""
    powers = [1 << i for i in range(int(math.log2(gpus)) + 1)]
    for tp in (t for t in powers if t <= gpus_per_node):
        for pp in powers:
            for cp in powers:
                if gpus % (tp * pp * cp):
                    continue
                for algorithm in (cp_algorithms if cp > 1 else ("all-gather",)):
                    for recompute in RECOMPUTE_MODES:
                        layout = ParallelLayout(tp, pp, cp, gpus // (tp * pp * cp),
                                                sequence_parallel=tp > 1,
                                                distributed_optimizer=True,
                                                cp_algorithm=algorithm, recompute=recompute)
                        try:
                            layout.validate(model, seq_length=seq_length)
                        except LayoutError:
                            continue
                        yield layout


def relative_step_time(layout: ParallelLayout, num_microbatches: int) -> float:
    """A coarse cost to rank layouts that fit (lower is better), not a throughput prediction.

    Recompute repeats forward work (full ~ +33% of the step, selective ~ +5% at long context
    where attention dominates the forward... counted as its share), the pipeline bubble idles
    (PP - 1) / (m + PP - 1), and every model-parallel degree adds communication that does not
    fully overlap (TP over NVLink ~4% per doubling, CP ~3% per doubling, both worse off-node).
    """
    recompute = {"none": 1.0, "selective": 1.1, "full": 1.33}[layout.recompute]
    pp = layout.pipeline_parallel
    bubble = 1 + (pp - 1) / max(num_microbatches, 1)
    tp_cost = 1 + 0.04 * math.log2(layout.tensor_parallel)
    cp_cost = 1 + 0.03 * math.log2(layout.context_parallel)
    return recompute * bubble * tp_cost * cp_cost
