"""The GPU simulated on the host, for the dry runs of training (engine.dryrun) and evaluation
(engine.evaluate.dry_run): the ``meta`` device stands in for the GPU, torch's fake process group
for NCCL, and a dispatch mode watches every operation.

    start_simulated_rank(layout, rank, world_size, seed, attention)  # once, in its own process
    mode = DryRunMode(names)
    with simulated_accelerator("meta"), mode:
        ...  # the real code path: every device decision takes its accelerator branch
    mode.peak  # bytes live at the peak, by kind

Every device decision takes its accelerator branch (engine.device.simulated_accelerator with
``meta`` standing in for the GPU), megatron-core's explicit CUDA calls go to ``meta``
(engine.megatron_compat.enable_meta_support), and the collectives run on the fake process group,
which pretends to be rank R of N. Tensors carry shapes, dtypes and devices but no values.

The mode fails, naming the operation, the tensor and the engine line, when a host tensor meets a
device tensor (a GPU raises there too) and when a collective is handed a host tensor (NCCL takes
device tensors only). It keeps the live bytes of every device storage by kind (weights,
gradients, optimizer state, activations saved for backward, temporaries).
ENGINE_DRY_RUN_TRACE=1 adds the stack to every error and lists the largest storages live at
the peak with the line that allocated each (ENGINE_DRY_RUN_TOP of them, default 12).

Values: a number read back to the host reads as 1, a tensor copied back to the host holds
zeros. A device tensor copied from the host keeps its host values beside it, so an operation
whose output shape depends on values (torch.nonzero of a batch's loss mask) gets the shape a GPU
would compute; on any other device tensor such an operation fails, naming it. An attention other
than ours (a config that names "torch" or "flash-attn") becomes a shape-only stand-in with
FlashAttention's memory profile (it keeps Q, K, V, the output and the log-sum-exp).
"""
from __future__ import annotations

import json
import linecache
import os
import subprocess
import sys
import traceback
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import engine.model.attention as model_attention
import engine.parallel.context.module as context_module
from engine.megatron_compat import enable_meta_support

GIB = 1024 ** 3
KINDS = ("weights", "gradients", "optimizer", "activations", "temporaries")
_ENGINE_ROOT = str(Path(__file__).resolve().parent.parent)
_COMPAT_FILE = str(Path(__file__).resolve().parent / "megatron_compat.py")
# Operations that legitimately read a host tensor into a device one (or back).
_COPY_OPS = {"aten::_to_copy", "aten::copy_", "aten::lift_fresh", "aten::lift_fresh_copy",
             "aten::_copy_from", "aten::_copy_from_and_resize", "aten::to"}
# Operations whose output shape depends on their input's values (the meta device has none).
_VALUE_SHAPED_OPS = {"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2"}


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
        # id(storage) -> the host values a device storage was copied from, laid out alike.
        self.host_values: dict[int, torch.Tensor] = {}

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
            self.host_values.pop(key, None)

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

    def _from_host_values(self, func, name: str, args, kwargs):
        """``func`` (whose output shape depends on values) on a device tensor copied from the
        host, or a view of one: computed on those host values, the result on the device."""
        tensor = args[0]
        host = self.host_values.get(id(tensor.untyped_storage()))
        if host is None:
            raise DryRunError(
                f"{name} at {_where()} needs the values of {self.describe(tensor)}, which a dry "
                f"run knows only for device tensors copied from the host (and views of them), "
                f"not for ones computed on the device (a limit of the dry run, not a GPU "
                f"failure): compute it from the host data, or extend engine.simulation for "
                f"this operation")
        view = host.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
        out = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t,
                              func(view, *args[1:], **kwargs))
        for result in pytree.tree_leaves(out):
            if isinstance(result, torch.Tensor):
                self._track(result)
        return out

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
        if name in _VALUE_SHAPED_OPS and args[0].device.type == "meta":
            return self._from_host_values(func, name, args, kwargs)
        if name == "aten::_to_copy" and args[0].device.type == "meta" and \
                torch.device(kwargs.get("device") or "meta").type == "cpu":
            # Read back to the host (scores, ...): zeros of the shape, as no values exist.
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        if name == "aten::_to_copy" and args[0].device.type == "cpu" and \
                out.device.type == "meta" and id(out.untyped_storage()) in self.kind_of:
            # Kept for the operations whose output shape depends on values (a batch's loss
            # mask, read by torch.nonzero), laid out as the device copy.
            host = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype)
            self.host_values[id(out.untyped_storage())] = host.copy_(args[0])
        if self.phase == "step" and func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


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


_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object",
                       "scatter_object_list")


def allow_object_collectives(mode: DryRunMode) -> None:
    """Let torch's object collectives (which place their byte tensors themselves) pass the
    mode's collective check. Under the fake group every rank receives this rank's object."""

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


def start_simulated_rank(layout, rank: int, world_size: int, seed: int, attention: str) -> None:
    """This process as rank ``rank`` of ``world_size`` in ``layout`` (engine.parallel.layout):
    megatron's CUDA calls on ``meta``, the fake process group, megatron's process groups and
    RNG; ``attention`` is the plan's kernel (only ours has a shape-only implementation, a csrc
    custom op; the others read document boundaries or need a GPU library, and become
    shape_only_attention). Process-wide and not undone: one simulated rank per process."""
    enable_meta_support()
    if attention != "ours":
        for module in (model_attention, context_module):
            module.varlen_attention_function = lambda backend: shape_only_attention
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
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def end_simulated_rank() -> None:
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def pipeline_stage() -> str:
    """This rank's pipeline stage: "first", "last", "first+last" (no pipeline) or "middle"."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return "+".join(s for s, on in (("first", first), ("last", last)) if on) or "middle"


def parameter_names(chunks) -> dict:
    """id(parameter) -> its name in its model chunk, for DryRunMode's messages."""
    return {id(param): name for chunk in chunks for name, param in chunk.named_parameters()}


def storage_kinds(chunks, other: str = "optimizer") -> Callable[[int], str]:
    """For the storages alive after the build of ``chunks`` (megatron DDP-wrapped, or bare
    modules for forward passes only): weights, gradients (DDP's gradient buffers) or
    ``other``."""
    weights, gradients = set(), set()
    for chunk in chunks:
        wrapped = hasattr(chunk, "module")  # megatron's DDP: its ``buffers`` are gradient buffers
        module = chunk.module if wrapped else chunk
        for tensor in list(module.parameters()) + list(module.buffers()):
            weights.add(id(tensor.untyped_storage()))
        if not wrapped:
            continue
        for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if getattr(buffer, "grad_data", None) is not None:
                gradients.add(id(buffer.grad_data.untyped_storage()))
            if getattr(buffer, "param_data", None) is not None:
                weights.add(id(buffer.param_data.untyped_storage()))
    return lambda key: ("weights" if key in weights else
                        "gradients" if key in gradients else other)


def peak_by_kind(mode: DryRunMode) -> dict:
    """Bytes live at the peak by kind (KINDS), and their total; prints the largest storages
    then live under ENGINE_DRY_RUN_TRACE=1."""
    for size, kind, where in mode.peak_largest:
        print(f"  at the peak: {size / GIB:8.3f} GiB {kind:<12} {where}", flush=True)
    peak = {kind: mode.peak.get(kind, 0) for kind in KINDS}
    peak["total"] = sum(peak.values())
    return peak


def default_ranks(layout) -> list[int]:
    """The first rank of the first and of the last pipeline stage (megatron orders ranks
    tensor, context, data, then pipeline: the last stage's ranks come last)."""
    per_stage = layout.world_size // layout.pipeline_parallel
    return sorted({0, layout.world_size - per_stage})


def add_dry_run_arguments(parser, does: str) -> None:
    """--world-size, --dry-run (which ``does`` what its help says), --rank, --dry-run-report."""
    parser.add_argument("--world-size", type=int,
                        help="with --check or --dry-run: processes of the run (default: "
                             "WORLD_SIZE, else 1)")
    parser.add_argument("--dry-run", action="store_true", help=does)
    parser.add_argument("--rank", type=int, help="with --dry-run: the rank to simulate "
                        "(default: the first rank of the first and of the last pipeline stage)")
    parser.add_argument("--dry-run-report", help="with --dry-run: write the report here (JSON)")


_CHILD = "ENGINE_DRY_RUN_CHILD"
_RESULT = "DRY_RUN_RESULT "


def in_rank_process(ranks: list[int]) -> bool:
    """Whether this process is the one that simulates ``ranks`` (a single rank)."""
    return len(ranks) == 1 and os.environ.get(_CHILD) == "1"


def emit_result(result: dict) -> None:
    """A rank process's result, for run_ranks_in_processes."""
    print(_RESULT + json.dumps(result), flush=True)


def run_ranks_in_processes(module: str, ranks: list[int]) -> tuple[int, list[dict]]:
    """Each of ``ranks`` simulated in a fresh process, ``python -m module`` with this process's
    arguments and ``--rank R`` (megatron's process groups and the meta redirection are
    process-wide); their output printed. (0 or the first failed rank's exit code, the results
    the rank processes emitted)."""
    results = []
    for rank in ranks:
        argv = _without_option(sys.argv[1:], ("--rank", "--dry-run-report"))
        proc = subprocess.run([sys.executable, "-m", module, *argv, "--rank", str(rank)],
                              env=dict(os.environ, **{_CHILD: "1"}), capture_output=True,
                              text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(_RESULT):
                results.append(json.loads(line[len(_RESULT):]))
            else:
                print(line, flush=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            print(f"error: the dry run of rank {rank} failed (above): a GPU run of this "
                  f"config would fail there too", file=sys.stderr, flush=True)
            return proc.returncode, results
    return 0, results


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
