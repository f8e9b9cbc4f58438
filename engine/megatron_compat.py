"""Every change this engine makes to megatron-core's behaviour, and every private megatron API
it calls, in one place.

megatron-core is used as a library through its public API (specs, configs, schedules, DDP,
optimizers, dist checkpointing). Where that is not enough, the patch lives here, with the
releases it was checked on and a test (tests/engine/test_megatron_compat.py) that fails when
megatron changes under it: each test runs megatron's own code without the patch and asserts that
the problem the patch exists for is still there, so a fixed upstream release shows up as a
failing test that says "drop the patch", not as a silent double fix.

Patches:

1. ``enable_cpu_support``: megatron-core has no CPU path. Its CUDA assumptions are routed to the
   CPU when no GPU is present (device placement, CUDA RNG state, the optimizer's CUDA type
   checks), so every layout runs on a laptop with gloo. Process-wide, and only without a GPU.
   ``enable_meta_support`` routes the same calls to the ``meta`` device instead, for the dry
   run (engine.dryrun): megatron then takes its GPU branch with shape-only tensors.
2. ``patch_reshardable_optimizer_load``: loading the "fully_reshardable" distributed-optimizer
   checkpoint format copies every destination state key, including torch Adam's per-parameter
   ``step``, which the checkpoint does not hold (KeyError 'step'). The patched copy takes the
   keys the checkpoint holds; the step is restored from the param groups.
3. ``allocate_distributed_optimizer_state``: the distributed optimizer can describe its state for
   loading only once Adam's state exists; megatron's private
   ``_init_optimizer_states_with_dummy_values`` allocates it (the load then overwrites it).
4. ``untie_adam_steps``: with torch's Adam (no Apex or transformer-engine, so on every CPU and
   on GPUs without them), the distributed optimizer's ``load_state_dict`` gives every
   parameter's ``state["step"]`` one shared tensor. Adam increments it once per parameter per
   step, so after a resume the bias correction runs far ahead of the real step and the run
   leaves the uninterrupted one from its first step on. Each parameter gets its own copy.

Differences between releases that the engine bridges:

5. ``mark_tensor_parallel``: the engine initializes weights itself (``perform_initialization``
   off), and megatron's grad-norm and checkpoint code read the tensor-parallel attributes that
   megatron sets when it initializes. Up to 0.17 megatron sets none without initializing; from
   0.18 its parallel linears and embeddings set them anyway and refuse a second setting.

6. ``patch_param_group_matching``: from 0.19 megatron pairs saved optimizer param groups with
   the current ones by a key that includes the schedule's values (``max_lr``, ``min_lr``,
   ``start_wd``, ``end_wd``), so a stage that starts from another stage's optimizer state at a
   new learning rate finds no matching group (KeyError in the distributed optimizer, ValueError
   in the others). The patched key leaves the schedule's values out, as up to 0.18: groups pair by
   what they hold (``wd_mult``, ``lr_mult``, expert/decoupled flags), the loaded groups carry the
   saved schedule values, and engine.train puts this run's back. The engine builds its groups
   from one OptimizerConfig, so no two of its groups differ only in schedule values (the case
   megatron widened the key for).
7. ``torch.cuda.current_stream`` on the CPU: from 0.19 the gradient buffer's ``start_grad_sync``
   asks for the current CUDA stream on every reduction (to wait on CUDA-graph events); a CPU
   torch raises there. ``enable_cpu_support`` gives it a stream whose waits are no-ops (CPU work
   is synchronous).

One private hook lives outside this file, because it is the model itself: engine/model/gpt.py's
``LlamaGPTModel`` overrides ``GPTModel._postprocess`` (the output layer and loss, private in every
release checked below) to compute the loss with csrc's fused linear cross-entropy and to score
answer tokens for evaluation. tests/engine/test_model_kernels.py trains with it
(``cross_entropy=ours``) and with megatron's own ``_postprocess`` (``all=torch``) and requires
the same losses and gradients, so a change of that method's signature fails there.

Versions: ``CHECKED_VERSIONS`` lists the megatron-core releases this file was checked on and
``TESTED_TORCH`` the torch releases (major.minor) the suite ran on. pip keeps whatever torch and
megatron-core (0.16.1-0.19.x) an environment has; ``warn_untested_versions`` prints one line at
start-up (rank 0) when either is not one of those.

Checked on (the whole CPU suite, tests/ engine and kernel selection): megatron-core 0.16.1, the
newest for Python 3.11, with torch 2.13; 0.17.1 and 0.18.2 on Python 3.12 with torch 2.13 (the
releases NeMo/NGC images carry); and 0.19.2 on Python 3.12 with torch 2.14 (CI's megatron-core
subset, .ci/run).
"""
from __future__ import annotations

import importlib.util
import os
import sys

from importlib.metadata import version

import torch
from megatron.core.optimizer import distrib_optimizer as megatron_distrib_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import random as megatron_random
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from packaging.version import Version
from torch.overrides import TorchFunctionMode

CHECKED_VERSIONS = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")
# torch major.minor releases the suite ran on: 2.13 (CPU, Python 3.11), 2.14 (Python 3.12 in CI).
TESTED_TORCH = ("2.13", "2.14")

_cpu_support_enabled = False

_CPU_TYPE_AS_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def megatron_version() -> str:
    return version("megatron-core")


# ---------------------------------------------------------------------------------------------
# 1. CPU support
# ---------------------------------------------------------------------------------------------

def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal in torch's factory functions and in Tensor.to.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU (or ``target``) for every torch call made under it."""

    def __init__(self, target: str = "cpu"):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=self.target)
        if func is torch.Tensor.cuda:
            return args[0] if self.target == "cpu" else args[0].to(self.target)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], self.target) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # megatron's optimizers accept only torch.cuda.*Tensor parameters.
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.core.optimizer"):
                if self.target == "meta":
                    # Only device parameters pass, as on a GPU: a host one keeps its name and
                    # megatron refuses it.
                    if not name.startswith("torch.meta."):
                        return name
                    name = name.replace("torch.meta.", "torch.")
                return _CPU_TYPE_AS_CUDA.get(name, name)
            return name
        return func(*args, **kwargs)


def _cpu_rng_get_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _redirect_cuda(target: str) -> None:
    """megatron's explicit CUDA calls, process-wide, onto ``target`` ("cpu" or "meta")."""
    # A device rather than an ordinal: megatron passes it as ``device=`` also inside autograd
    # backward functions, where no TorchFunctionMode is active.
    torch.cuda.current_device = lambda: torch.device(target)
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay a no-op here.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    # megatron's model-parallel RNG tracker saves and restores CUDA generator states.
    megatron_random._get_cuda_rng_state = _cpu_rng_get_state
    megatron_random._set_cuda_rng_state = _cpu_rng_set_state
    # megatron-core 0.19 waits on the current CUDA stream while reducing gradients (patch 7).
    give_cuda_a_cpu_stream()
    # Pushed for the life of the process: megatron creates CUDA tensors lazily, e.g. in its
    # gradient buffers and pipeline send/receive buffers.
    _CudaToCpuMode(target).__enter__()


def enable_cpu_support(force: bool = False) -> bool:
    """Route megatron-core's CUDA assumptions to the CPU when no GPU is usable.

    Idempotent. Returns True when CPU support is (now) active. With ``force`` it turns on even
    when CUDA is available (tests use this to compare).
    """
    global _cpu_support_enabled
    if _cpu_support_enabled:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _redirect_cuda("cpu")
    _cpu_support_enabled = True
    return True


def enable_meta_support() -> None:
    """Route megatron-core's CUDA calls to the ``meta`` device, for a dry run in a process of
    its own (engine.dryrun): what enable_cpu_support does for the CPU, with the GPU branch of
    megatron's own device decisions taken. Process-wide; not undone.

    The RNG calls use the host generator: no meta operation draws random numbers, and
    megatron's recompute still saves and restores a state, as on a GPU.
    """
    global _cpu_support_enabled
    if _cpu_support_enabled:
        raise RuntimeError("enable_meta_support after enable_cpu_support: run the dry run in a "
                           "process of its own")
    _redirect_cuda("meta")
    _cpu_support_enabled = True


# ---------------------------------------------------------------------------------------------
# 2. Loading the fully reshardable distributed-optimizer format
# ---------------------------------------------------------------------------------------------

def _copy_present_states(self, model_param, tensors):
    """DistributedOptimizer._set_main_param_and_optimizer_states copying only the keys present
    in ``tensors`` (megatron's copies every destination key, and torch Adam's "step" is not in a
    fully_reshardable checkpoint)."""
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _copy_present_states.original(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        destination[key].copy_(value)


def patch_reshardable_optimizer_load() -> None:
    """Install _copy_present_states on megatron's DistributedOptimizer (idempotent)."""
    current = DistributedOptimizer._set_main_param_and_optimizer_states
    if current is _copy_present_states:
        return
    _copy_present_states.original = current
    DistributedOptimizer._set_main_param_and_optimizer_states = _copy_present_states


# ---------------------------------------------------------------------------------------------
# 3. Optimizer state to load into
# ---------------------------------------------------------------------------------------------

def allocate_distributed_optimizer_state(optimizer) -> None:
    """Allocate Adam's state in every distributed optimizer of ``optimizer`` that has none yet."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


# ---------------------------------------------------------------------------------------------
# 4. Adam's step after loading
# ---------------------------------------------------------------------------------------------

def untie_adam_steps(optimizer) -> int:
    """Give each parameter of every distributed optimizer of ``optimizer`` its own Adam
    ``step`` tensor where loading left one shared by several; returns how many were copied."""
    copied = 0
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer):
            continue
        seen = set()
        for state in sub.optimizer.state.values():
            step = state.get("step")
            if not torch.is_tensor(step):
                continue
            if id(step) in seen:
                state["step"] = step.clone()
                copied += 1
            else:
                seen.add(id(step))
    return copied


# ---------------------------------------------------------------------------------------------
# 5. Tensor-parallel attributes of weights the engine initializes
# ---------------------------------------------------------------------------------------------

_TENSOR_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def mark_tensor_parallel(name: str, param: torch.nn.Parameter, dim: int | None,
                         stride: int) -> None:
    """Give ``param`` (canonical name ``name``) megatron's tensor-parallel attributes: split
    along ``dim`` (None: replicated) in ``stride`` interleaved blocks per rank.

    megatron-core >= 0.18 has already set them on its parallel linear and embedding weights when
    the engine gets the model (0.16 and 0.17 only when megatron initializes weights itself);
    there they must agree with the engine's sharding, or the two disagree about what a weight
    shard holds (RuntimeError naming the parameter).
    """
    wanted = (dim is not None, 0 if dim is None else dim, stride)
    present = [hasattr(param, attribute) for attribute in _TENSOR_PARALLEL_ATTRIBUTES]
    if not any(present):
        set_tensor_model_parallel_attributes(param, *wanted)
        return
    found = tuple(getattr(param, attribute, None) for attribute in _TENSOR_PARALLEL_ATTRIBUTES)
    # A replicated weight's dimension and stride mean nothing; megatron leaves its defaults.
    if found != wanted and not (found[0] is False and wanted[0] is False):
        raise RuntimeError(
            f"megatron-core {megatron_version()} marks parameter {name} as "
            f"(tensor_model_parallel, partition_dim, partition_stride) = {found}, the engine's "
            f"sharding (engine/model/sharding.py) says {wanted}: make the two agree")


# ---------------------------------------------------------------------------------------------
# 6. Pairing saved optimizer param groups with the current ones
# ---------------------------------------------------------------------------------------------

# The param-group values a run's schedule sets (megatron's scheduler reads them each step), as
# opposed to the values that say which parameters a group holds and how they are treated.
SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _identifier_modules():
    # Each module reads its own global when it pairs groups (distrib_optimizer imported it).
    return [module for module in (megatron_optimizer, megatron_distrib_optimizer)
            if hasattr(module, "param_group_identifier_keys")]


def patch_param_group_matching() -> None:
    """Drop the schedule's values from megatron's param-group pairing key (idempotent; nothing
    to do before 0.19, whose key never held them)."""
    for module in _identifier_modules():
        keys = module.param_group_identifier_keys
        module.param_group_identifier_keys = tuple(k for k in keys if k not in SCHEDULE_KEYS)


# ---------------------------------------------------------------------------------------------
# 7. The current CUDA stream on the CPU
# ---------------------------------------------------------------------------------------------

class _CpuStream:
    """What torch.cuda.current_stream() returns under CPU support: CPU work is synchronous, so
    there is never anything to wait for or record."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()
# torch's own, for the test that checks megatron still needs the replacement.
cuda_current_stream = torch.cuda.current_stream


def give_cuda_a_cpu_stream() -> None:
    """Make torch.cuda.current_stream return a stream whose waits are no-ops (part of
    enable_cpu_support and enable_meta_support)."""
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM


# ---------------------------------------------------------------------------------------------
# Versions pip kept that this file was not checked on
# ---------------------------------------------------------------------------------------------

def _minor(version_text: str) -> str:
    release = Version(version_text).release
    return f"{release[0]}.{release[1] if len(release) > 1 else 0}"


def untested_versions(torch_version: str, megatron_core_version: str) -> str | None:
    """One line naming the torch / megatron-core version that was not tested and the tested
    ones; None when both were tested. torch counts by major.minor (2.14.0a0+nv... is 2.14)."""
    untested = []
    if _minor(torch_version) not in TESTED_TORCH:
        untested.append(f"torch {torch_version} (tested: {', '.join(TESTED_TORCH)})")
    if megatron_core_version not in CHECKED_VERSIONS:
        untested.append(f"megatron-core {megatron_core_version} (tested: "
                        f"{', '.join(CHECKED_VERSIONS)})")
    if not untested:
        return None
    return (f"longctx-engine: warning: untested {' and '.join(untested)}; it should work, but "
            f"run tests/engine/test_megatron_compat.py here before trusting results")


def _first_process() -> bool:
    """Whether this is the first process of a launch (RANK / SLURM_PROCID unset or 0)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def warn_untested_versions() -> None:
    """Print ``untested_versions`` for the running torch and megatron-core to stderr, from the
    first process of a launch only (RANK / SLURM_PROCID unset or 0)."""
    if not _first_process():
        return
    message = untested_versions(torch.__version__, megatron_version())
    if message:
        print(message, file=sys.stderr, flush=True)


# The optional GPU libraries (module, distribution) that megatron-core and the engine use when
# present: transformer-engine's layers and fused kernels, apex's fused optimizer and norms,
# flash-attn's attention, triton for the engine's own kernels.
OPTIONAL_GPU_LIBRARIES = (("transformer_engine", "transformer-engine"), ("apex", "apex"),
                          ("flash_attn", "flash-attn"), ("triton", "triton"))


def absent_gpu_libraries() -> list[str]:
    return [name for module, name in OPTIONAL_GPU_LIBRARIES
            if importlib.util.find_spec(module) is None]


def note_absent_gpu_libraries() -> None:
    """One line on stderr, from the first process of a launch, naming the optional GPU libraries
    that are not installed (in place of megatron-core's warnings, which engine/__init__.py
    silences)."""
    if not _first_process():
        return
    absent = absent_gpu_libraries()
    if absent:
        print(f"longctx-engine: optional GPU libraries not installed: {', '.join(absent)} "
              f"(their PyTorch fallbacks are used)", file=sys.stderr, flush=True)


# Once per process, at the first import (every entry point that touches megatron-core gets here).
warn_untested_versions()
note_absent_gpu_libraries()
