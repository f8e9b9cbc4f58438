"""Variable-length (document-masked) causal attention with GQA; flash-attn varlen semantics.

    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

impl="torch" is plain PyTorch (csrc/attention/reference.py, the specification and the CPU
path), impl="ours" the fused kernels (csrc/attention/triton_kernels.py), impl="auto" Triton on
CUDA and the reference elsewhere.
"""
from __future__ import annotations

import math
import weakref

import torch

from csrc.attention.merge import merge_attention_outputs
from csrc.attention.reference import reference_varlen_attention
from csrc.triton_support import resolve_impl, values_readable

__all__ = ["varlen_attention", "merge_attention_outputs", "reference_varlen_attention", "validate_varlen_inputs"]

TRITON_HEAD_DIMS = (64, 128)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


# cu_seqlens tensors already checked, with the (version, total, max_seqlen) they passed for: every
# layer of a model reuses one cu_seqlens per micro-batch, and only the first call should pay the sync.
# Keyed by id() (tensors compare element-wise, so they cannot be dict keys); the weak reference
# confirms the id still names the same tensor and drops the entry when the tensor dies.
_VALIDATED: dict[int, tuple[weakref.ref, tuple[int, int, int]]] = {}


def _check_cu_seqlens(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    if not values_readable(cu_seqlens):  # shapes only: a dry run's meta tensors, torch.compile tracing
        return _check_cu_seqlens_values(name, cu_seqlens, total, max_seqlen, max_name)
    key = (cu_seqlens._version, total, max_seqlen)
    entry = _VALIDATED.get(id(cu_seqlens))
    if entry is not None and entry[0]() is cu_seqlens and entry[1] == key:
        return
    _check_cu_seqlens_values(name, cu_seqlens, total, max_seqlen, max_name)
    tensor_id = id(cu_seqlens)
    _VALIDATED[tensor_id] = (weakref.ref(cu_seqlens, lambda _: _VALIDATED.pop(tensor_id, None)), key)


def _check_cu_seqlens_values(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"{name} must be an int32 tensor [n_docs + 1] with n_docs >= 1, got dtype {cu_seqlens.dtype} "
            f"shape {tuple(cu_seqlens.shape)}; build it as torch.tensor([0, len0, len0 + len1, ...], dtype=torch.int32)"
        )
    if not values_readable(cu_seqlens):  # a dry run's meta tensors, or torch.compile tracing
        return
    offsets = cu_seqlens.tolist()  # the one host sync of the call: cheap next to attention itself
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(
            f"{name} = {offsets[:4]}...{offsets[-1:]} must start at 0 and end at the token count {total}; "
            "it holds the cumulative document lengths of the packed tensor"
        )
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if min(lengths) < 0:
        doc = lengths.index(min(lengths))
        raise ValueError(
            f"{name} decreases at document {doc} ({offsets[doc]} -> {offsets[doc + 1]}); "
            "offsets must be non-decreasing (empty documents are allowed)"
        )
    if max(lengths) > max_seqlen:
        raise ValueError(
            f"{max_name} = {max_seqlen} is smaller than the longest document ({max(lengths)} tokens); "
            f"pass {max_name} = max of {name}.diff()"
        )


def validate_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, impl: str) -> None:
    """Raise ValueError naming the bad value and the fix; impl is the resolved "ours" | "torch"."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [tokens, heads, head_dim] (THD), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; "
            "flatten [batch, seq] into tokens and describe documents with cu_seqlens"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of KV heads {k.shape[1]} (GQA groups); "
            "check num_attention_heads / num_query_groups after tensor-parallel splitting"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device == cu_seqlens_q.device == cu_seqlens_k.device):
        raise ValueError("q, k, v, cu_seqlens_q, cu_seqlens_k must be on one device; move cu_seqlens with .to(q.device)")
    allowed = TRITON_DTYPES if impl == "ours" else REFERENCE_DTYPES
    if q.dtype not in allowed:
        raise ValueError(f"dtype {q.dtype} is not supported by impl={impl!r}; use one of {allowed}")
    if impl == "ours":
        if q.shape[2] not in TRITON_HEAD_DIMS:
            raise ValueError(
                f"head_dim {q.shape[2]} is not supported by the Triton kernel (supported: {TRITON_HEAD_DIMS}); "
                "use impl='torch' or a model with head_dim 64 or 128"
            )
        # In-document offsets are multiplied by row strides in int32 inside the kernel.
        for name, t, max_len in (("q", q, max_seqlen_q), ("k", k, max_seqlen_k), ("v", v, max_seqlen_k)):
            if max_len * t.stride(0) >= 2**31:
                raise ValueError(
                    f"{name}: longest document ({max_len} tokens) x row stride {t.stride(0)} overflows int32 offsets; "
                    "split the document or use fewer heads per rank"
                )
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} must describe "
            "the same documents (same length)"
        )
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed documents; each query only sees keys of its own document.

    Args:
        q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] with Hq % Hkv == 0 (GQA: query head h uses KV head
            h // (Hq // Hkv)). bf16/fp16/fp32 (fp64 too for the reference); the Triton kernel
            supports D in (64, 128), the reference any D. Accumulation is fp32.
        cu_seqlens_q, cu_seqlens_k: int32 [n_docs + 1], cumulative document lengths, from 0 to Tq / Tk.
        max_seqlen_q, max_seqlen_k: longest document in tokens (at least the true maximum).
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned when a document has fewer queries lq than keys lk: query i
            sees keys j <= i + lk - lq (what context parallelism with all-gathered K/V needs).
            Queries that see no key (lq > lk) return out = 0 and lse = -inf, with zero gradients.
        impl: "auto" | "ours" | "torch".

    Returns:
        out [Tq, Hq, D] in q's dtype; lse [Hq, Tq] fp32 natural-log log-sum-exp of the scaled
        scores (differentiable, for merge_attention_outputs).
    """
    resolved = resolve_impl(impl, q, "varlen_attention")
    validate_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, resolved)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if resolved == "torch":
        return reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
    from csrc.attention.triton_kernels import triton_varlen_attention

    return triton_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
