"""The GPU path proven without a GPU: one complete training step of a real config, for one rank
of N, on the ``meta`` device under torch's fake process group.

    python -m engine.train --dry-run --world-size 8 --config engine/configs/prolong-stage1-64k.yaml

Every device decision takes its accelerator branch (engine.device.simulated_accelerator with
``meta`` standing in for the GPU), megatron-core's explicit CUDA calls go to ``meta``
(engine.megatron_compat.enable_meta_support), and the collectives run on the fake process group,
which pretends to be rank R of N. Tensors carry shapes, dtypes and devices but no values, so the
step costs seconds of CPU at 512K tokens, with every micro-batch of the schedule, forward,
backward with the configured recompute, gradient reduction, clipping and the optimizer step.
Then it builds the state the first checkpoint save hands megatron's dist_checkpointing (the
model's and optimizer's sharded state dicts, engine.checkpoint.sharded_state), writing nothing;
that build is checked but left out of the memory peak.
Synthetic micro-batches of the real shape (documents of a ProLong-like length mix) replace data.

The simulation (engine.simulation) watches every operation: it fails, naming the operation,
the tensor and the engine line, when a host tensor meets a device tensor (a GPU raises there
too) and when a collective is handed a host tensor (NCCL takes device tensors only); shape and
divisibility errors surface as in a real run. It keeps the live bytes of every device storage
by kind (weights, gradients, optimizer state, activations saved for backward, temporaries); the
peak is reported beside the planner's estimate (engine.planner.memory) for the same layout.
ENGINE_DRY_RUN_TRACE=1 adds the stack to every error and lists the largest storages live at
the peak with the line that allocated each (ENGINE_DRY_RUN_TOP of them, default 12).

What a dry run cannot know: values. A number read back to the host (a loss, a gradient norm)
reads as 1. Kernels: those a GPU run chooses (the plan is resolved for the simulated device);
csrc's custom ops run their shape-only implementations. An attention other than ours (a config
that names "torch" or "flash-attn") becomes a shape-only stand-in with FlashAttention's memory
profile (engine.simulation.shape_only_attention). The planner is asked about the same kernels.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.distributed import param_and_grad_buffer as megatron_buffers
from megatron.core.optimizer import clip_grads as megatron_clip_grads
from torch.overrides import TorchFunctionMode

from engine.checkpoint import sharded_state
from engine.device import simulated_accelerator
from engine.megatron_compat import allocate_distributed_optimizer_state
from engine.parallel.param_sync import parameters_current
from engine.planner.memory import Workload, estimate_memory
from engine.planner.plan import PlanError, check_fits
from engine.simulation import (
    GIB,
    DryRunError,
    DryRunMode,
    allow_object_collectives,
    default_ranks,
    emit_result,
    end_simulated_rank,
    in_rank_process,
    parameter_names,
    peak_by_kind,
    pipeline_stage,
    run_ranks_in_processes,
    start_simulated_rank,
    storage_kinds,
)
from engine.training import build
from engine.training.config import ConfigError
from engine.training.data import (
    InMemorySequences,
    SampleSource,
    global_batch_slots,
    rank_micro_batches,
)
from engine.training.metrics import training_flops
from engine.training.step import train_step

# Dense bf16 tensor-core peak of the card, from its datasheet (without sparsity).
DATASHEET_PEAK_FLOPS = {"H100-SXM": 989e12, "H200": 989e12, "A100": 312e12}
# The share of that peak the step's matmuls are assumed to reach: the prediction's one
# assumption (long-context Llama training runs report 40-60% MFU on H100).
ASSUMED_EFFICIENCY = 0.5
__all__ = ["DryRunError", "check_dry_run", "default_ranks", "run", "run_rank"]


class _ExplicitHostAsMeta(TorchFunctionMode):
    """megatron's save gathers optimizer state through host buffers it places explicitly
    (device="cpu", .cpu()): shapes only here, so no host memory at real scale. A tensor created
    on the host by default still meets DryRunMode's checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return args[0]
        if str(kwargs.get("device")) == "cpu":
            kwargs = dict(kwargs, device=torch.device("meta"))
        return func(*args, **kwargs)


def attention_flops(model, doc_lengths) -> float:
    """Forward FLOPs of the attention the causal document mask keeps (QK^T and PV)."""
    lengths = np.asarray(doc_lengths, dtype=np.float64)
    return 2 * 2 * model.num_layers * model.hidden_size * float((lengths * (lengths + 1) / 2).sum())


def synthetic_document_lengths(seq_length: int, samples: int, seed: int = 0) -> list[np.ndarray]:
    """Document lengths of ``samples`` packed sequences in a ProLong-like mix: about half the
    sequences one long document (books, code repositories), the others packed with documents
    log-uniform between 256 tokens and half the sequence (web, shorter long-form text)."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(samples):
        if rng.random() < 0.5:
            result.append(np.array([seq_length], dtype=np.int64))
            continue
        lengths, left = [], seq_length
        while left > 0:
            length = int(np.exp(rng.uniform(np.log(256), np.log(max(seq_length // 2, 257)))))
            lengths.append(min(length, left))
            left -= lengths[-1]
        result.append(np.array(lengths, dtype=np.int64))
    return result


@dataclass
class DryRunResult:
    rank: int
    stage: str
    peak: dict
    planner: dict
    flops_per_step: float
    executed_flops_rank: float
    predicted_step_s: float
    predicted_mfu: float
    cpu_seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Issued:
    def wait(self):
        pass


@contextmanager
def _one_by_one(group=None, device=None, async_ops=False):
    """torch.distributed._coalescing_manager issuing the collectives one by one: the meta
    device has no kernel for the coalesced ones (the same tensors reach the same checks)."""
    yield _Issued()


def _device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The fused multi_tensor_l2norm a GPU run gets from transformer-engine or apex, on the
    device: megatron's fallback for machines without them reads every norm to the host."""
    norms = torch.stack([torch.norm(t) for tensors in tensor_lists for t in tensors])
    return torch.norm(norms).reshape(1).float(), None


def _checked_before_wrapping(wrap):
    """engine.training.build.wrap_data_parallel, first checking that every parameter and
    buffer is on the device: megatron's DDP sizes its gradient buffers on the current GPU and
    its optimizer takes GPU parameters only (Megatron-LM's get_model moves the model first)."""
    def checked(chunks, *args, **kwargs):
        for index, chunk in enumerate(chunks):
            named = list(chunk.named_parameters()) + list(chunk.named_buffers())
            for name, tensor in named:
                if tensor.device.type != "meta":
                    raise DryRunError(
                        f"{'parameter' if isinstance(tensor, torch.nn.Parameter) else 'buffer'} "
                        f"{name} [{'x'.join(map(str, tensor.shape))}] of model chunk {index} is "
                        f"on {tensor.device} when megatron's DDP wraps the model: a GPU run "
                        f"fails there; move the model once after building it "
                        f"(engine.device.module_to_accelerator)")
        return wrap(chunks, *args, **kwargs)
    return checked


def run_rank(plan, rank: int, world_size: int, card: str = "H100-SXM") -> DryRunResult:
    """One training step of ``plan`` as rank ``rank`` of ``world_size``, in this process."""
    started = time.process_time()
    megatron_buffers._coalescing_manager = _one_by_one
    build.wrap_data_parallel = _checked_before_wrapping(build.wrap_data_parallel)
    megatron_clip_grads.l2_norm_impl = _device_l2_norm
    layout = plan.layout
    start_simulated_rank(layout, rank, world_size, plan.seed, plan.kernels.attention)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    stage = pipeline_stage()

    names: dict = {}
    mode = DryRunMode(names)
    allow_object_collectives(mode)
    with simulated_accelerator("meta"), mode:
        state = build.build_training_state(plan)
        names.update(parameter_names(state.chunks))
        # The state a resumed run loads into (and the first step would create).
        allocate_distributed_optimizer_state(state.optimizer)
        mode.reclassify(storage_kinds(state.chunks))

        lengths = synthetic_document_lengths(plan.seq_length, plan.global_batch, plan.seed)
        sequences = InMemorySequences([np.zeros(plan.seq_length, np.int64)] * plan.global_batch,
                                      lengths)
        micro_batches, doc_lengths, _ = rank_micro_batches(
            SampleSource(sequences, plan.seq_length), list(range(plan.global_batch)),
            data_parallel=layout.data_parallel,
            dp_rank=parallel_state.get_data_parallel_rank(),
            cp_size=layout.context_parallel, cp_rank=parallel_state.get_context_parallel_rank(),
            num_microbatches=plan.num_microbatches, micro_batch=plan.micro_batch,
            position_mode=plan.data.position_mode if plan.data else "continuous",
            mask_cross_document=True, balance_attention=False)
        mode.phase = "step"
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: (mode.mark_saved(t), t)[1], lambda t: t):
            train_step(state.chunks, state.optimizer, state.scheduler, micro_batches,
                       plan.num_microbatches, plan.seq_length, plan.micro_batch)
        # What the first save builds before writing (model and optimizer sharded state), so a
        # host/device slip there fails here too; nothing is written.
        mode.phase = "checkpoint"
        with _ExplicitHostAsMeta(), parameters_current(state.chunks):
            checkpoint = sharded_state(state.chunks, state.optimizer)
        print(f"rank {rank}: checkpoint state built, "
              f"{sum(1 for _ in nested_values(checkpoint))} sharded entries (nothing written)",
              flush=True)
        del checkpoint
    executed = float(mode.flops)
    # The stand-in attention does no arithmetic: count what the kernel would, forward 1x,
    # backward 2.5x (dQ, dK, dV and the recomputed scores), forward again under full recompute.
    mine = [doc_lengths[i] for group in _rank_slots(plan, parallel_state) for i in group]
    recompute_factor = 1.0 if layout.recompute == "none" else 2.0
    attention = sum(attention_flops(plan.model, d) for d in mine) * (recompute_factor + 2.5)
    executed += attention / (layout.tensor_parallel * layout.context_parallel
                             * layout.pipeline_parallel)
    if last and plan.kernels.cross_entropy == "ours":
        # The fused output layer + cross-entropy is a custom op too: its three matmuls (logits,
        # hidden gradient, weight gradient) over this rank's tokens and vocabulary shard.
        tokens = sum(int(np.sum(d)) for d in mine) / layout.context_parallel
        vocab = plan.model.padded_vocab_size(layout.tensor_parallel) / layout.tensor_parallel
        executed += 3 * 2 * tokens * plan.model.hidden_size * vocab
    model_flops = sum(training_flops(plan.model, d) for d in doc_lengths)
    peak_flops = DATASHEET_PEAK_FLOPS[card]
    step_s = executed / (peak_flops * ASSUMED_EFFICIENCY)
    mfu = model_flops / world_size / step_s / peak_flops

    work = Workload(plan.seq_length, plan.micro_batch, weight_bytes=2 if plan.bf16 else 4,
                    fused_cross_entropy=plan.kernels.cross_entropy == "ours",
                    kernels="fused" if plan.kernels.rmsnorm == "ours" else "unfused")
    planner = estimate_memory(plan.model, layout, work)
    end_simulated_rank()
    peak = peak_by_kind(mode)
    return DryRunResult(rank, stage, peak, {**planner.__dict__, "total": planner.total,
                                            "notes": list(planner.notes)},
                        model_flops, executed, step_s, mfu, time.process_time() - started)


def _rank_slots(plan, parallel_state):

    lengths = synthetic_document_lengths(plan.seq_length, plan.global_batch, plan.seed)
    slots = global_batch_slots(lengths, data_parallel=plan.layout.data_parallel,
                               num_microbatches=plan.num_microbatches,
                               micro_batch=plan.micro_batch, balance_attention=False)
    return slots[parallel_state.get_data_parallel_rank()]


def check_dry_run(plan, gpu_memory_gb: float = 80.0) -> None:
    """ConfigError unless ``plan`` fits ``gpu_memory_gb`` GPUs by the planner's estimate for the
    kernels a GPU run chooses (engine.planner.plan.check_fits), before any process group."""

    work = Workload(plan.seq_length, plan.micro_batch, weight_bytes=2 if plan.bf16 else 4)
    try:
        check_fits(plan.model, plan.layout, work, gpu_memory_gb)
    except PlanError as error:
        raise ConfigError(str(error)) from None


def format_result(result: DryRunResult, plan) -> str:
    peak, planner = result.peak, result.planner
    planner_act = planner["activations"] + planner["logits"] + planner["communication"]
    rows = [("weights", peak["weights"], planner["weights"]),
            ("gradients", peak["gradients"], planner["gradients"]),
            ("optimizer state", peak["optimizer"], planner["optimizer"]),
            ("activations", peak["activations"], None),
            ("temporaries", peak["temporaries"], None),
            ("activations + temporaries", peak["activations"] + peak["temporaries"], planner_act),
            ("total", peak["total"], planner["total"])]
    lines = [f"dry run: rank {result.rank} ({result.stage} pipeline stage) of "
             f"{plan.layout.describe()}, {plan.global_batch} x {plan.seq_length} tokens per step "
             f"({plan.num_microbatches} micro-batches), {result.cpu_seconds:.1f} s of CPU",
             f"  peak memory (GiB)          {'dry run':>9} {'planner':>9}"]
    for label, ours, theirs in rows:
        shown = f"{theirs / GIB:9.2f}" if theirs is not None else " " * 9
        lines.append(f"  {label:<26} {ours / GIB:9.2f} {shown}")
    ratio = peak["total"] / planner["total"] if planner["total"] else float("nan")
    lines.append(f"  dry run / planner total: {ratio:.3f}")
    lines.append(f"  FLOPs per step (kept attention only): {result.flops_per_step:.4g}; "
                 f"executed on this rank (recompute included): {result.executed_flops_rank:.4g}")
    if result.stage == "first+last":  # every rank holds the whole model's share of the work
        lines.append(f"  PREDICTION (not a measurement): step {result.predicted_step_s:.2f} s, "
                     f"MFU {result.predicted_mfu:.1%} at the H100 SXM datasheet bf16 peak, "
                     f"assuming the step's arithmetic runs at {ASSUMED_EFFICIENCY:.0%} of it")
    else:
        lines.append(f"  PREDICTION (not a measurement): this rank's arithmetic takes "
                     f"{result.predicted_step_s:.2f} s at {ASSUMED_EFFICIENCY:.0%} of the H100 "
                     f"SXM datasheet bf16 peak; the step waits for the slowest stage")
    return "\n".join(lines)


def run(plan, world_size: int, ranks: list[int], report: Optional[str]) -> int:
    """The dry run of ``ranks``, each in a fresh process (megatron's process groups and the
    meta redirection are process-wide); prints and writes the report; 0 on success."""

    if in_rank_process(ranks):
        result = run_rank(plan, ranks[0], world_size)
        print(format_result(result, plan), flush=True)
        emit_result(result.as_dict())
        return 0
    code, results = run_ranks_in_processes("engine.train", ranks)
    if code:
        return code
    if len(results) > 1:
        # A rank's own MFU divides the whole step's FLOPs by its own time: a light pipeline
        # stage alone would claim more than the card can do. The step waits for the slowest.
        slowest = max(results, key=lambda r: r["predicted_step_s"])
        mfu = slowest["flops_per_step"] / world_size / slowest["predicted_step_s"] / (
            DATASHEET_PEAK_FLOPS["H100-SXM"])
        print(f"PREDICTION for the step (the slowest simulated rank, {slowest['rank']}; pipeline "
              f"bubbles not counted): {slowest['predicted_step_s']:.2f} s, MFU {mfu:.1%}",
              flush=True)
    if report:
        Path(report).write_text(json.dumps({"layout": plan.layout.describe(),
                                            "world_size": world_size, "ranks": results},
                                           indent=1))
    return 0


