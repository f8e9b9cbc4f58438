"""Run megatron-core on a machine without a GPU.

megatron-core 0.16 assumes CUDA in three ways, and this module routes each to the CPU:

1. Device placement: ``device="cuda"`` arguments and ``tensor.cuda()`` are redirected to the
   CPU by a TorchFunctionMode that stays pushed for the life of the process, and
   ``torch.cuda.current_device()`` returns the CPU device (autograd runs backward functions
   without the mode, and megatron's use ``device=torch.cuda.current_device()``).
2. RNG: megatron's model-parallel RNG tracker saves and restores CUDA generator states; here
   those calls read and write the CPU generator instead.
3. Type checks: megatron's optimizers accept only ``torch.cuda.*Tensor`` parameters; for callers
   inside ``megatron.core.optimizer`` a CPU tensor reports its CUDA type name.

It turns on only through :func:`enable_cpu_support`, which does nothing when a GPU is present.
This lets a user debug a TP x PP x CP x DP layout on a laptop with the gloo backend.
"""
from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False

_CPU_TYPE_AS_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal in torch's factory functions and in Tensor.to.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.core.optimizer"):
                return _CPU_TYPE_AS_CUDA.get(name, name)
            return name
        return func(*args, **kwargs)


def _cpu_rng_get_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def cpu_support_enabled() -> bool:
    return _ENABLED


def enable_cpu_support(force: bool = False) -> bool:
    """Route megatron-core's CUDA assumptions to the CPU when no GPU is usable.

    Idempotent. Returns True when CPU support is (now) active. With ``force`` it turns on even
    when CUDA is available (tests use this to compare).
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    # A device rather than an ordinal: megatron passes it as ``device=`` also inside autograd
    # backward functions, where no TorchFunctionMode is active.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay a no-op here.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_get_state
    mcore_random._set_cuda_rng_state = _cpu_rng_set_state

    # Pushed for the life of the process: megatron creates CUDA tensors lazily, e.g. in its
    # gradient buffers and pipeline send/receive buffers.
    _CudaToCpuMode().__enter__()
    _ENABLED = True
    return True
