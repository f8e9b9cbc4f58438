"""Attention backends: which can run where, and the one varlen function signature they share.

    backend = select_attention_backend("auto", device)   # "ours" on CUDA, "torch" elsewhere
    attend = varlen_attention_function(backend)          # same signature for all
    out, lse = attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

The engine resolves its choice once per run (engine.model.kernel_choices.KernelChoices.resolve,
which calls select_attention_backend) and hands the modules a concrete backend.

Availability is checked with importlib.util.find_spec: flash-attn and transformer-engine are
imported only when their backend is actually used (both are slow to import, and TE pulls in CUDA
libraries that a CPU machine lacks).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from csrc.triton_support import ours_by_default, triton_importable, triton_runs_on

ATTENTION_BACKENDS = ("auto", "ours", "flash-attn", "transformer-engine", "torch")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def attention_backend_available(backend: str, device: torch.device | str) -> tuple[bool, str]:
    """(usable, reason if not) for a concrete backend on a device, without importing it."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if backend == "torch":
        return True, ""
    if backend == "ours":
        if not triton_importable():
            return False, "triton is not installed (pip install triton)"
        if not triton_runs_on(device):
            return False, "our Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for tests)"
        return True, ""
    if backend == "flash-attn":
        if not on_cuda:
            return False, "flash-attn needs a CUDA device"
        return (True, "") if _installed("flash_attn") else (False, "flash-attn is not installed (pip install flash-attn)")
    if backend == "transformer-engine":
        if not on_cuda:
            return False, "transformer-engine needs a CUDA device"
        if _installed("transformer_engine"):
            return True, ""
        return False, "transformer-engine is not installed (pip install 'transformer-engine[pytorch]')"
    raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")


def select_attention_backend(requested: str, device: torch.device | str) -> str:
    """Resolve the configured backend to "ours" | "flash-attn" | "transformer-engine" | "torch".

    "auto" is "ours" on CUDA when triton is importable and "torch" (the plain reference) otherwise.
    An explicit request that cannot run here is an error naming the reason, never a silent switch.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={requested!r} is not one of {ATTENTION_BACKENDS}")
    if requested == "auto":
        return "ours" if ours_by_default(device) else "torch"
    usable, reason = attention_backend_available(requested, device)
    if not usable:
        raise ValueError(f"attention_backend={requested!r} cannot run on {device}: {reason}; or set attention_backend='auto'")
    return requested


def _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True):
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, return_attn_probs=True,
    )
    return out, lse


def varlen_attention_function(backend: str) -> Callable:
    """The function (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
    causal=True) -> (out [Tq, Hq, D], lse [Hq, Tq]) for a backend returned by select_attention_backend.

    Only "ours" and "torch" propagate a gradient through lse (needed when context parallelism merges
    partial results with merge_attention_outputs); flash-attn's lse is a constant for autograd.
    transformer-engine offers attention as a module, not a function: the layer spec uses megatron's
    TEDotProductAttention for it.
    """
    from csrc.attention import varlen_attention

    if backend == "ours":
        return lambda *args, **kwargs: varlen_attention(*args, **kwargs, impl="ours")
    if backend == "torch":
        return lambda *args, **kwargs: varlen_attention(*args, **kwargs, impl="torch")
    if backend == "flash-attn":
        return _flash_attn_varlen
    if backend == "transformer-engine":
        raise ValueError(
            "transformer-engine attention is a module (megatron.core.extensions.transformer_engine.TEDotProductAttention); "
            "build it in the layer spec instead of asking for a function"
        )
    raise ValueError(f"backend {backend!r} is not a resolved backend; call select_attention_backend first")
