"""When the Triton kernels can run, shared by every kernel module in csrc/.

Triton is imported lazily: importing csrc must stay cheap on CPU, and TRITON_INTERPRET (which lets
the kernels run on CPU tensors for tests) is read when a kernel is decorated, so it has to be set
before the first kernel module is imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch

IMPL_CHOICES = ("auto", "ours", "torch")


def triton_importable() -> bool:
    """True when the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Devices that stand for a GPU: "meta" is what a dry run computes on. On it (and on FakeTensorMode
# tensors of any device) the kernels' custom ops run their shape-only fake implementations.
GPU_DEVICE_TYPES = ("cuda", "meta")


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether a Triton kernel can run on ``device`` in this process (CUDA, the meta device of a
    dry run through the ops' fake implementations, or the CPU under TRITON_INTERPRET=1)."""
    if not triton_importable():
        return False
    device = torch.device(device)
    return device.type in GPU_DEVICE_TYPES or (device.type == "cpu" and triton_interpreting())


def ours_by_default(device: torch.device | str) -> bool:
    """What "auto" means for every kernel choice, here and in the engine's KernelChoices: our
    Triton kernels on CUDA (and on the meta device that stands for it in a dry run), the
    plain-PyTorch references elsewhere (on CPU the interpreter is far too slow for real use)."""
    return torch.device(device).type in GPU_DEVICE_TYPES and triton_importable()


def values_readable(*tensors: torch.Tensor) -> bool:
    """Whether the tensors hold data a check may read on the host: not under torch.compile
    tracing, not meta, not FakeTensorMode. Shape checks run either way; value checks (label
    ranges, cu_seqlens offsets) only where this is True."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not any(t.device.type == "meta" or is_fake(t) for t in tensors)


def resolve_impl(impl: str, tensor: torch.Tensor, op: str) -> str:
    """Turn impl="auto" | "ours" | "torch" into "ours" (Triton) or "torch" (the reference) for
    this tensor's device.

    Asking for "ours" where it cannot run is an error, not a silent fallback, so benchmarks and
    tests measure what they name.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPL_CHOICES}")
    if impl == "auto":
        return "ours" if ours_by_default(tensor.device) else "torch"
    if impl == "ours" and not triton_runs_on(tensor.device):
        raise ValueError(
            f"{op}: impl='ours' cannot run on a {tensor.device.type} tensor here "
            f"(triton installed: {triton_importable()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); "
            "move the tensors to CUDA, set TRITON_INTERPRET=1 before importing triton, or use impl='torch'"
        )
    return impl


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be upcast to fp32 before the product.

    Triton's CPU interpreter returns garbage for bf16 tl.dot (checked with triton 3.9: errors of
    1e10 on a 16x16 product) while bf16 loads, casts and stores are exact. Under the interpreter
    the kernels therefore multiply bf16 tiles in fp32; on a GPU they use bf16 tensor cores.
    """
    return dtype == torch.bfloat16 and triton_interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: exact fp32 products for fp32 inputs (tests), the default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
