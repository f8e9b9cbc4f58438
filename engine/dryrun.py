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

A dispatch mode watches every operation. It fails, naming the operation, the tensor and the
engine line, when a host tensor meets a device tensor (a GPU raises there too) and when a
collective is handed a host tensor (NCCL takes device tensors only); shape and divisibility
errors surface as in a real run. It also keeps the live bytes of every device storage by kind
(weights, gradients, optimizer state, activations saved for backward, temporaries) and reports
the peak beside the planner's estimate (engine.planner.memory) for the same layout.
ENGINE_DRY_RUN_TRACE=1 adds the stack to every error and lists the largest storages live at
the peak with the line that allocated each (ENGINE_DRY_RUN_TOP of them, default 12).

What a dry run cannot know: values. A number read back to the host (a loss, a gradient norm)
reads as 1. Kernels: those a GPU run chooses (the plan is resolved for the simulated device);
csrc's custom ops run their shape-only implementations. An attention other than ours (a config
that names "torch" or "flash-attn") becomes a shape-only stand-in with FlashAttention's memory
profile (it keeps Q, K, V, the output and the log-sum-exp). The planner is asked about the same
kernels.
"""
from __future__ import annotations

import json
import linecache
import os
import subprocess
import sys
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.distributed import param_and_grad_buffer as megatron_buffers
from megatron.core.optimizer import clip_grads as megatron_clip_grads
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import engine.model.attention as model_attention
import engine.parallel.context.module as context_module
from engine.checkpoint import sharded_state
from engine.device import simulated_accelerator
from engine.megatron_compat import allocate_distributed_optimizer_state, enable_meta_support
from engine.parallel.param_sync import parameters_current
from engine.planner.memory import Workload, estimate_memory
from engine.planner.plan import PlanError, check_fits
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

GIB = 1024 ** 3
# Dense bf16 tensor-core peak of the card, from its datasheet (without sparsity).
DATASHEET_PEAK_FLOPS = {"H100-SXM": 989e12, "H200": 989e12, "A100": 312e12}
# The share of that peak the step's matmuls are assumed to reach: the prediction's one
# assumption (long-context Llama training runs report 40-60% MFU on H100).
ASSUMED_EFFICIENCY = 0.5
KINDS = ("weights", "gradients", "optimizer", "activations", "temporaries")
_ENGINE_ROOT = str(Path(__file__).resolve().parent.parent)
_COMPAT_FILE = str(Path(__file__).resolve().parent / "megatron_compat.py")
# Operations that legitimately read a host tensor into a device one (or back).
_COPY_OPS = {"aten::_to_copy", "aten::copy_", "aten::lift_fresh", "aten::lift_fresh_copy",
             "aten::_copy_from", "aten::_copy_from_and_resize", "aten::to"}


class DryRunError(RuntimeError):
    """A GPU run would fail here: the message names the operation, the tensor and the line."""

    def __init__(self, message: str):
        if os.environ.get("ENGINE_DRY_RUN_TRACE") == "1":
            message += "\n" + "".join(traceback.format_stack()[:-1])
        super().__init__(message)


def _where() -> str:
    """The innermost frame of the engine (or megatron) outside this module and torch."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name in (__file__, _COMPAT_FILE) or "/torch/" in name:
            continue
        line = (linecache.getline(name, frame.lineno) or "").strip()
        shown = name[len(_ENGINE_ROOT) + 1:] if name.startswith(_ENGINE_ROOT) else name
        return f"{shown}:{frame.lineno} ({line})"
    return "unknown location"


class DryRunMode(TorchDispatchMode):
    """Checks devices at every operation and tracks live ``meta`` storage bytes by kind."""

    def __init__(self, names: Optional[dict] = None):
        super().__init__()
        self.names = names if names is not None else {}  # id(tensor) -> parameter name
        self.kind_of: dict[int, str] = {}  # id(storage) -> kind
        self.bytes_of: dict[int, int] = {}
        self.live = dict.fromkeys(KINDS + ("build",), 0)
        self.peak_total = 0
        self.peak = dict(self.live)
        self.phase = "build"
        self.saved: set[int] = set()
        self.storages: dict[int, weakref.ref] = {}
        # Inside torch's object collectives (all_gather_object, ...), which pick their tensors'
        # device themselves (the current GPU under NCCL, the host under the fake group).
        self.object_collectives = 0
        # FLOPs of the step's operations, counted here rather than by FlopCounterMode: its
        # module hooks, registered again by every recomputation inside megatron's checkpoint
        # backward, keep each recomputed layer's input and input gradient alive (2 GiB a
        # micro-batch for Llama-3-8B at 64K in TP4 x CP2), which a GPU run does not.
        self.flops = 0
        # ENGINE_DRY_RUN_TRACE=1: where each storage was allocated, the largest at the peak.
        self.trace = os.environ.get("ENGINE_DRY_RUN_TRACE") == "1"
        self.where_of: dict[int, str] = {}
        self.peak_largest: list = []

    # -- naming ---------------------------------------------------------------------------
    def describe(self, tensor: torch.Tensor) -> str:
        name = self.names.get(id(tensor))
        shape = "x".join(map(str, tensor.shape)) or "scalar"
        what = f"parameter {name}" if name else "tensor"
        return f"{what} [{shape}] {str(tensor.dtype).replace('torch.', '')} on {tensor.device}"

    # -- memory ---------------------------------------------------------------------------
    def _track(self, tensor: torch.Tensor) -> None:
        # The checkpoint's state is built after the step, mostly in host buffers (see
        # __torch_dispatch__): the peak stays the step's.
        if tensor.device.type != "meta" or self.phase == "checkpoint":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.kind_of:
            return
        size = storage.nbytes()
        kind = "temporaries" if self.phase == "step" else "build"
        self.kind_of[key], self.bytes_of[key] = kind, size
        if self.trace:
            self.where_of[key] = _where()
        self.storages[key] = weakref.ref(storage)
        weakref.finalize(storage, self._free, key)
        self.live[kind] += size
        self._update_peak()

    def _free(self, key: int) -> None:
        kind = self.kind_of.pop(key, None)
        if kind is not None:
            self.live[kind] -= self.bytes_of.pop(key)
            self.storages.pop(key, None)
            self.saved.discard(key)

    def _update_peak(self) -> None:
        total = sum(self.live.values())
        if total > self.peak_total:
            self.peak_total, self.peak = total, dict(self.live)
            if self.trace and self.phase == "step":
                self.peak_largest = sorted(
                    ((self.bytes_of[k], self.kind_of[k], self.where_of.get(k, "?"))
                     for k in self.kind_of), reverse=True)[:int(os.environ.get("ENGINE_DRY_RUN_TOP", "12"))]

    def reclassify(self, kind_of_storage) -> None:
        """Give every live storage of kind "build" the kind ``kind_of_storage(key)`` says."""
        for key, kind in list(self.kind_of.items()):
            if kind == "build":
                new = kind_of_storage(key)
                self.kind_of[key] = new
                self.live["build"] -= self.bytes_of[key]
                self.live[new] += self.bytes_of[key]
        self.peak_total, self.peak = sum(self.live.values()), dict(self.live)

    def mark_saved(self, tensor: torch.Tensor) -> None:
        """Autograd keeps ``tensor`` for backward: an activation, not a temporary."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
            return
        key = id(tensor.untyped_storage())
        if self.kind_of.get(key) == "temporaries":
            self.kind_of[key] = "activations"
            self.live["temporaries"] -= self.bytes_of[key]
            self.live["activations"] += self.bytes_of[key]

    # -- checks ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = func._schema.name
        if name.startswith("c10d::") and not self.object_collectives:
            for tensor in tensors:
                if tensor.device.type != "meta":
                    raise DryRunError(
                        f"collective {name} was handed a host {self.describe(tensor)} at "
                        f"{_where()}: NCCL takes GPU tensors only; create it with "
                        f"device=engine.device.accelerator() or move it with to_accelerator")
        elif name not in _COPY_OPS and any(t.device.type == "meta" for t in tensors):
            for tensor in tensors:
                # A 0-dim host tensor is a scalar argument, which CUDA kernels accept too.
                if tensor.device.type != "meta" and tensor.dim() > 0:
                    raise DryRunError(
                        f"host {self.describe(tensor)} meets device tensors in {name} at "
                        f"{_where()}: a GPU run fails here; move it with "
                        f"engine.device.to_accelerator (modules: module_to_accelerator)")
        if name == "aten::_local_scalar_dense" and args[0].device.type == "meta":
            # No values on meta: a number read back to the host reads as 1.
            return True if args[0].dtype == torch.bool else (
                1.0 if args[0].is_floating_point() else 1)
        out = func(*args, **kwargs)
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        if self.phase == "step" and func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


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


class _ShapeOnlyAttention(torch.autograd.Function):
    """Document-masked causal attention without values: FlashAttention's outputs and saved
    tensors (Q, K, V, output, log-sum-exp), gradients of the inputs' shapes."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k):
        if not (q.device == k.device == v.device == cu_seqlens_q.device == cu_seqlens_k.device):
            raise DryRunError(
                f"attention inputs on different devices: q {q.device}, k {k.device}, "
                f"v {v.device}, cu_seqlens_q {cu_seqlens_q.device}, cu_seqlens_k "
                f"{cu_seqlens_k.device}; move cu_seqlens with MicroBatch.to_accelerator")
        if q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[2] != k.shape[2]:
            raise DryRunError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                              f"v {tuple(v.shape)} do not form grouped-query attention")
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


def shape_only_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale=None, causal=True):
    return _ShapeOnlyAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k)


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


_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object",
                       "scatter_object_list")


def _allow_object_collectives(mode: DryRunMode) -> None:

    def wrap(function):
        def wrapped(*args, **kwargs):
            mode.object_collectives += 1
            try:
                return function(*args, **kwargs)
            finally:
                mode.object_collectives -= 1
        return wrapped

    for name in _OBJECT_COLLECTIVES:
        setattr(dist, name, wrap(getattr(dist, name)))


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


def _storage_kinds(state, names: dict) -> callable:
    """For the storages alive after the build: weights, gradients or optimizer state."""
    weights, gradients = set(), set()
    for chunk in state.chunks:
        module = chunk.module  # megatron's DDP: its ``buffers`` are its gradient buffers
        for tensor in list(module.parameters()) + list(module.buffers()):
            weights.add(id(tensor.untyped_storage()))
        for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if getattr(buffer, "grad_data", None) is not None:
                gradients.add(id(buffer.grad_data.untyped_storage()))
            if getattr(buffer, "param_data", None) is not None:
                weights.add(id(buffer.param_data.untyped_storage()))
    return lambda key: ("weights" if key in weights else
                        "gradients" if key in gradients else "optimizer")


def run_rank(plan, rank: int, world_size: int, card: str = "H100-SXM") -> DryRunResult:
    """One training step of ``plan`` as rank ``rank`` of ``world_size``, in this process."""


    started = time.process_time()
    enable_meta_support()
    megatron_buffers._coalescing_manager = _one_by_one
    build.wrap_data_parallel = _checked_before_wrapping(build.wrap_data_parallel)
    megatron_clip_grads.l2_norm_impl = _device_l2_norm
    if plan.kernels.attention != "ours":
        # Only our kernel has a shape-only implementation (a csrc custom op); the others read
        # document boundaries or need a GPU library.
        for module in (model_attention, context_module):
            module.varlen_attention_function = lambda backend: shape_only_attention
    layout = plan.layout
    # The fake backend for meta tensors too (pipeline p2p looks the backend up by device).
    dist.init_process_group("cpu:fake,cuda:fake,meta:fake", store=FakeStore(), rank=rank,
                            world_size=world_size)
    # megatron's distributed optimizer asks for its gloo groups (checkpoint gathers); under the
    # fake process group they are fake groups too.
    new_group = dist.new_group
    dist.new_group = lambda *a, **k: new_group(*a, **{**k, "backend": None}
                                               if k.get("backend") == "gloo" else k)
    try:
        parallel_state.initialize_model_parallel(**layout.megatron_sizes())
    finally:
        dist.new_group = new_group
    tensor_parallel.model_parallel_cuda_manual_seed(plan.seed)
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    stage = "+".join(s for s, on in (("first", first), ("last", last)) if on) or "middle"

    names: dict = {}
    mode = DryRunMode(names)
    _allow_object_collectives(mode)
    with simulated_accelerator("meta"), mode:
        state = build.build_training_state(plan)
        for chunk in state.chunks:
            for name, param in chunk.named_parameters():
                names[id(param)] = name
        # The state a resumed run loads into (and the first step would create).
        allocate_distributed_optimizer_state(state.optimizer)
        mode.reclassify(_storage_kinds(state, names))

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
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    for size, kind, where in mode.peak_largest:
        print(f"  at the peak: {size / GIB:8.3f} GiB {kind:<12} {where}", flush=True)
    peak = {kind: mode.peak.get(kind, 0) for kind in KINDS}
    peak["total"] = sum(peak.values())
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


def default_ranks(layout) -> list[int]:
    """The first rank of the first and of the last pipeline stage (megatron orders ranks
    tensor, context, data, then pipeline: the last stage's ranks come last)."""
    per_stage = layout.world_size // layout.pipeline_parallel
    return sorted({0, layout.world_size - per_stage})


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

    results = []
    for rank in ranks:
        if len(ranks) == 1 and os.environ.get("ENGINE_DRY_RUN_CHILD") == "1":
            result = run_rank(plan, rank, world_size)
            print(format_result(result, plan), flush=True)
            print("DRY_RUN_RESULT " + json.dumps(result.as_dict()), flush=True)
            return 0
        argv = _without_option(sys.argv[1:], ("--rank", "--dry-run-report"))
        proc = subprocess.run([sys.executable, "-m", "engine.train", *argv, "--rank", str(rank)],
                              env=dict(os.environ, ENGINE_DRY_RUN_CHILD="1"),
                              capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("DRY_RUN_RESULT "):
                results.append(json.loads(line[len("DRY_RUN_RESULT "):]))
            else:
                print(line, flush=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            print(f"error: the dry run of rank {rank} failed (above): a GPU run of this config "
                  f"would fail there too", file=sys.stderr, flush=True)
            return proc.returncode
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


def _without_option(argv: list[str], options: tuple[str, ...]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if any(arg.startswith(option + "=") for option in options):
            continue
        kept.append(arg)
    return kept
