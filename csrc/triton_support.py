"""When the Triton kernels can run, shared by every kernel module in csrc/.

Triton is imported lazily: importing csrc must stay cheap on CPU, and TRITON_INTERPRET (which lets
the kernels run on CPU tensors for tests) is read when a kernel is decorated, so it has to be set
before the first kernel module is imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch

IMPL_CHOICES = ("auto", "triton", "reference")


def triton_importable() -> bool:
    """True when the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor's device in this process."""
    if not triton_importable():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreting())


def resolve_impl(impl: str, tensor: torch.Tensor, op: str) -> str:
    """Turn impl="auto" | "triton" | "reference" into "triton" or "reference" for this tensor.

    auto picks Triton for CUDA tensors when triton is installed and the plain-PyTorch reference
    otherwise (CPU, where the interpreter is far too slow for real use). Asking for "triton" where it
    cannot run is an error, not a silent fallback, so benchmarks and tests measure what they name.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPL_CHOICES}")
    if impl == "auto":
        return "triton" if tensor.is_cuda and triton_importable() else "reference"
    if impl == "triton" and not triton_can_run_on(tensor):
        raise ValueError(
            f"{op}: impl='triton' cannot run on a {tensor.device.type} tensor here "
            f"(triton installed: {triton_importable()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); "
            "move the tensors to CUDA, set TRITON_INTERPRET=1 before importing triton, or use impl='reference'"
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
