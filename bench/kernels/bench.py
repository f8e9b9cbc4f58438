"""Benchmarks of the csrc kernels against the alternatives, measured in one run.

    python bench/kernels/bench.py attention            # H100 defaults: 64K packed tokens, hdim 128, bf16
    python bench/kernels/bench.py linear-ce
    python bench/kernels/bench.py rmsnorm | rope | swiglu
    python bench/kernels/bench.py all --smoke          # CPU, tiny sizes, reference vs torch only
    python bench/kernels/bench.py correctness --tokens 8192   # bf16 kernels vs fp32 references
    python bench/kernels/bench.py attention-tiles      # a few backward tile configurations

Each sub-command times forward+backward (and forward alone for the element-wise ops) of every
available candidate with CUDA events (warmup, then the median of --iters), records the peak
memory allocated during the step, and prints ratios against our kernel from the same run, plus
TFLOP/s (attention: only the FLOPs the causal document mask keeps) or GB/s (minimum bytes moved)
as a fraction of the datasheet peaks of the GPU the run found (H100 / H200 SXM: 989 TFLOP/s dense
bf16; 3.35 / 4.8 TB/s HBM).
Candidates whose library is missing (FlexAttention, flash-attn, Liger-Kernel) are skipped and
named in the output. Every run appends one JSON line (device, date, command, rows) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from csrc.attention import varlen_attention  # noqa: E402
from csrc.linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402
from csrc.rmsnorm import rms_norm  # noqa: E402
from csrc.rope import apply_rope, apply_rope_cos_sin, rope_cos_sin  # noqa: E402
from csrc.swiglu import swiglu  # noqa: E402

# NVIDIA datasheet peaks (dense bf16 TFLOP/s, HBM GB/s) by device name; H100 when unknown.
DATASHEET_PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0)}


def device_peaks() -> tuple[float, float]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((peaks for key, peaks in DATASHEET_PEAKS.items() if key in name),
                DATASHEET_PEAKS["H100"])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    op: str
    candidate: str
    pass_: str  # "fwd" | "fwd+bwd"
    ms: float | None = None
    peak_mib: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup: int, iters: int) -> tuple[float, float | None]:
    """(median milliseconds, peak MiB allocated during one call above what was live before)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return statistics.median(times), peak


def fwd_bwd(forward, inputs):
    """A step: forward, then backward from the (first) output with a ones cotangent."""
    def step():
        for t in inputs:
            t.grad = None
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return step


def run_candidates(op, candidates, device, args, flops=None, moved_bytes=None, passes=("fwd+bwd", "fwd")):
    """Time each (name, forward, step, skip_reason) candidate for each pass.

    flops / moved_bytes: {pass: count} giving TFLOP/s / GB/s columns. A candidate with a skip
    reason, or one that raises, becomes a row that says so instead of stopping the run.
    """
    rows = []
    for name, forward, step, skip_reason in candidates:
        if skip_reason:
            rows.append(Row(op, name, passes[0], note=f"skipped: {skip_reason}"))
            continue
        for pass_name in passes:
            fn = step if pass_name == "fwd+bwd" else forward
            try:
                ms, peak = measure(fn, device, args.warmup, args.iters)
            except Exception as error:  # a failing baseline (or its OOM) must not hide the others
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(Row(op, name, pass_name, note=f"failed: {type(error).__name__}: {str(error)[:120]}"))
                continue
            row = Row(op, name, pass_name, ms=ms, peak_mib=peak)
            if flops:
                row.tflops = flops[pass_name] / (ms * 1e-3) / 1e12
            if moved_bytes:
                row.gbps = moved_bytes[pass_name] / (ms * 1e-3) / 1e9
            rows.append(row)
    return rows


def _optional(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except Exception:
        return None


def _compiled(fn, args):
    return None if args.smoke else torch.compile(fn)


def document_lengths(total: int, mode: str, seed: int = 0) -> list[int]:
    """Packed-sequence document lengths: "single" = one document; "mixed" = ProLong-like mixture of
    a few long documents and many short ones (seeded, so every run packs the same way)."""
    if mode == "single":
        return [total]
    gen = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        long_doc = torch.rand((), generator=gen).item() < 0.3
        scale = total // 4 if long_doc else max(total // 64, 1)
        n = min(left, max(1, int(torch.randint(1, scale + 1, (), generator=gen))))
        lengths.append(n)
        left -= n
    return lengths


def attention_flops(lengths: list[int], heads_q: int, head_dim: int) -> dict[str, float]:
    """FLOPs the causal document mask keeps: a document of L tokens has L (L + 1) / 2 (query, key)
    pairs; forward is 4 FLOPs per pair, head and channel (QK^T and PV), backward 2.5x forward."""
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    forward = 4.0 * pairs * head_dim * heads_q
    return {"fwd": forward, "fwd+bwd": 3.5 * forward}


def bench_attention(args, device, dtype):
    total, heads_q, heads_kv, head_dim = args.tokens, args.heads, args.kv_heads, args.head_dim
    lengths = document_lengths(total, args.docs)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(total, heads_q, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, heads_kv, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, heads_kv, head_dim, device=device, dtype=dtype, requires_grad=True)
    inputs, longest = (q, k, v), max(lengths)
    flops = attention_flops(lengths, heads_q, head_dim)

    def ours():
        return varlen_attention(q, k, v, cu, cu, longest, longest, impl="ours")

    def reference():
        return varlen_attention(q, k, v, cu, cu, longest, longest, impl="torch")

    def sdpa_per_document():  # plain PyTorch a user would write: one SDPA call per document
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            outs.append(F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, enable_gqa=True).transpose(0, 1))
        return torch.cat(outs)

    candidates = []
    if args.smoke:
        candidates.append(("reference (ours, plain torch)", reference, fwd_bwd(reference, inputs), None))
        candidates.append(("torch SDPA per document", sdpa_per_document, fwd_bwd(sdpa_per_document, inputs), None))
    else:
        candidates.append(("ours (Triton)", ours, fwd_bwd(ours, inputs), None))
        candidates.append(flex_candidate(q, k, v, lengths, device, inputs))
        flash = _optional("flash_attn")
        if flash is not None:
            def flash_fn():
                return flash.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
            candidates.append(("flash-attn", flash_fn, fwd_bwd(flash_fn, inputs), None))
        else:
            candidates.append(("flash-attn", None, None, "flash_attn not installed"))
        candidates.append(("torch SDPA per document", sdpa_per_document, fwd_bwd(sdpa_per_document, inputs), None))
        if args.with_reference:
            candidates.append(("reference (plain torch)", reference, fwd_bwd(reference, inputs), None))
    rows = run_candidates("attention", candidates, device, args, flops=flops)
    flex_ms = {r.pass_: r.ms for r in rows if r.candidate.startswith("FlexAttention") and r.ms}
    for row in rows:
        if row.ms and row.pass_ in flex_ms:
            row.extra["flex_ms_over_ms"] = flex_ms[row.pass_] / row.ms  # > 1: faster than FlexAttention
    config = dict(tokens=total, documents=len(lengths), longest=longest, heads=heads_q, kv_heads=heads_kv,
                  head_dim=head_dim, dtype=str(dtype), fwd_flops=flops["fwd"])
    return rows, config


def flex_candidate(q, k, v, lengths, device, inputs):
    """FlexAttention with a causal document block mask (built once, outside the timing)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return ("FlexAttention", None, None, f"unavailable: {error}")
    doc_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

    total = q.shape[0]
    block_mask = create_block_mask(document_causal, None, None, total, total, device=device)
    flex = torch.compile(flex_attention)

    def run():
        out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                   block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    return ("FlexAttention (compiled, document block mask)", run, fwd_bwd(run, inputs), None)


def bench_linear_ce(args, device, dtype):
    tokens, hidden_size, vocab = args.tokens, args.hidden, args.vocab
    hidden = (torch.randn(tokens, hidden_size, device=device, dtype=dtype) / math.sqrt(hidden_size)).requires_grad_()
    weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[::10] = -100
    inputs = (hidden, weight)
    floor_mib = 2 * (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    # logits GEMM forward + two GEMMs backward. Ours computes gradients inside forward, so only
    # fwd+bwd compares like with like.
    flops = {"fwd+bwd": 6.0 * tokens * hidden_size * vocab}

    def unfused():
        logits = hidden @ weight.t()
        return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")

    def ours():
        return fused_linear_cross_entropy(hidden, weight, labels, impl="ours")[0]

    def reference():
        return fused_linear_cross_entropy(hidden, weight, labels, impl="torch")[0]

    candidates = []
    if args.smoke:
        candidates.append(("reference (ours, plain torch)", reference, fwd_bwd(reference, inputs), None))
        candidates.append(("torch matmul + cross_entropy", unfused, fwd_bwd(unfused, inputs), None))
    else:
        candidates.append(("ours (Triton, chunked)", ours, fwd_bwd(ours, inputs), None))
        candidates.append(("torch matmul + cross_entropy", unfused, fwd_bwd(unfused, inputs), None))
        compiled = _compiled(unfused, args)
        candidates.append(("torch.compile(matmul + CE)", compiled, fwd_bwd(compiled, inputs), None))
        liger = _optional("liger_kernel.transformers.functional")
        if liger is not None:
            def liger_fn():
                return liger.liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum")
            candidates.append(("Liger fused linear CE", liger_fn, fwd_bwd(liger_fn, inputs), None))
        else:
            candidates.append(("Liger fused linear CE", None, None, "liger-kernel not installed"))
    rows = run_candidates("linear-ce", candidates, device, args, flops=flops, passes=("fwd+bwd",))
    for row in rows:
        if row.peak_mib is not None:
            row.extra["peak_over_floor"] = row.peak_mib / floor_mib
    config = dict(tokens=tokens, hidden=hidden_size, vocab=vocab, dtype=str(dtype), memory_floor_mib=floor_mib)
    return rows, config


def elementwise_candidates(ours, reference, torch_eager, liger_fn, liger_reason, inputs, args):
    """Smoke: our reference vs the usual torch formulation. Full: ours vs torch eager, torch.compile
    of the same formulation, and Liger-Kernel."""
    if args.smoke:
        return [("reference (ours, plain torch)", reference, fwd_bwd(reference, inputs), None),
                ("torch eager", torch_eager, fwd_bwd(torch_eager, inputs), None)]
    compiled = _compiled(torch_eager, args)
    return [
        ("ours (Triton)", ours, fwd_bwd(ours, inputs), None),
        ("torch eager", torch_eager, fwd_bwd(torch_eager, inputs), None),
        ("torch.compile", compiled, fwd_bwd(compiled, inputs), None),
        ("Liger-Kernel", liger_fn, fwd_bwd(liger_fn, inputs) if liger_fn else None, liger_reason),
    ]


def _liger():
    liger = _optional("liger_kernel.transformers.functional")
    return liger, (None if liger is not None else "liger-kernel not installed")


def bench_rmsnorm(args, device, dtype):
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(args.hidden, device=device, dtype=dtype, requires_grad=True)
    liger, reason = _liger()
    candidates = elementwise_candidates(
        lambda: rms_norm(x, w, 1e-5, impl="ours"), lambda: rms_norm(x, w, 1e-5, impl="torch"),
        lambda: F.rms_norm(x, (args.hidden,), w, 1e-5),
        (lambda: liger.liger_rms_norm(x, w, 1e-5, in_place=False)) if liger else None, reason, (x, w), args)
    size = x.numel() * x.element_size()
    # forward reads x, writes y; backward reads x and dy, writes dx
    rows = run_candidates("rmsnorm", candidates, device, args, moved_bytes={"fwd": 2 * size, "fwd+bwd": 5 * size})
    return rows, dict(tokens=args.tokens, hidden=args.hidden, dtype=str(dtype))


def bench_rope(args, device, dtype):
    heads, head_dim = args.heads, args.head_dim
    q = torch.randn(args.tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    lengths = document_lengths(args.tokens, args.docs)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    cos, sin = rope_cos_sin(positions, head_dim, 500000.0)
    liger, reason = _liger()

    # Hugging Face's formulation: duplicated [T, D] tables in the activation dtype, rotate_half.
    full_cos = torch.cat([cos, cos], -1)[:, None, :].to(dtype)
    full_sin = torch.cat([sin, sin], -1)[:, None, :].to(dtype)

    def hf_eager():
        half = head_dim // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        return q * full_cos + rotated * full_sin

    def liger_fn():  # Liger wants [batch, heads, seq, dim]; it rotates q and k, k = q here
        q4 = q.transpose(0, 1)[None]
        return liger.liger_rope(q4, q4, full_cos[:, 0][None], full_sin[:, 0][None])[0]

    candidates = elementwise_candidates(
        lambda: apply_rope(q, positions, 500000.0, impl="ours"),
        lambda: apply_rope_cos_sin(q, cos, sin, impl="torch"),
        hf_eager, liger_fn if liger else None, reason, (q,), args)
    size = q.numel() * q.element_size()
    rows = run_candidates("rope", candidates, device, args, moved_bytes={"fwd": 2 * size, "fwd+bwd": 4 * size})
    return rows, dict(tokens=args.tokens, heads=heads, head_dim=head_dim, dtype=str(dtype))


def bench_swiglu(args, device, dtype):
    gate_up = torch.randn(args.tokens, 2 * args.ffn, device=device, dtype=dtype, requires_grad=True)
    liger, reason = _liger()
    def torch_eager():
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up

    candidates = elementwise_candidates(
        lambda: swiglu(gate_up, impl="ours"), lambda: swiglu(gate_up, impl="torch"), torch_eager,
        (lambda: liger.liger_swiglu(*gate_up.chunk(2, -1))) if liger else None, reason, (gate_up,), args)
    out_size = gate_up.numel() * gate_up.element_size() // 2
    # forward reads [T, 2F], writes [T, F]; backward reads [T, 2F] and dO [T, F], writes [T, 2F]
    rows = run_candidates("swiglu", candidates, device, args, moved_bytes={"fwd": 3 * out_size, "fwd+bwd": 8 * out_size})
    return rows, dict(tokens=args.tokens, ffn=args.ffn, dtype=str(dtype))


def bench_attention_tiles(args, device, dtype):
    """Our attention forward+backward with a few backward tile configurations for this GPU's
    architecture (the first is the default)."""
    from csrc.attention.triton_kernels import default_blocks, triton_varlen_attention
    from csrc.triton_support import triton_interpreting

    total, head_dim = args.tokens, args.head_dim
    lengths = document_lengths(total, args.docs)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(total, args.heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, args.kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, args.kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    arch = 10 * torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 90
    base = default_blocks(head_dim, dtype, triton_interpreting(), arch)
    sweep = [{}, dict(dkdv_m=64, dkdv_n=64), dict(dq_m=64, dq_n=64), dict(stages=2)]
    if not triton_interpreting():
        sweep.insert(1, dict(warps_bwd=4 if base["warps_bwd"] == 8 else 8))
    candidates = []
    for change in sweep:
        blocks = {**base, **change}

        def forward(blocks=blocks):
            return triton_varlen_attention(q, k, v, cu, cu, head_dim ** -0.5, True, blocks)

        name = (f"ours{' (default)' if not change else ''}: dq {blocks['dq_m']}x{blocks['dq_n']}, "
                f"dkdv {blocks['dkdv_m']}x{blocks['dkdv_n']}, {blocks['warps_bwd']} warps, {blocks['stages']} stages")
        candidates.append((name, forward, fwd_bwd(forward, (q, k, v)), None))
    flops = attention_flops(lengths, args.heads, head_dim)
    rows = run_candidates("attention-tiles", candidates, device, args, flops=flops, passes=("fwd+bwd",))
    return rows, dict(tokens=total, documents=len(lengths), head_dim=head_dim, dtype=str(dtype), arch=arch)


def relative_errors(got: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """max |got - expected| / max |expected| and mean |got - expected| / mean |expected|."""
    got, expected = got.detach().double(), expected.detach().double()
    difference = (got - expected).abs()
    return {"max_rel": (difference.max() / expected.abs().max().clamp_min(1e-30)).item(),
            "mean_rel": (difference.mean() / expected.abs().mean().clamp_min(1e-30)).item()}


def _fp32_linear_ce(hidden, weight, labels, chunk: int = 1024):
    """fp32 loss and gradients of the summed cross-entropy, chunk by chunk (no [T, V] tensor)."""
    h, w = hidden.detach().float(), weight.detach().float()
    loss, grad_h, grad_w = torch.zeros((), device=h.device), torch.empty_like(h), torch.zeros_like(w)
    for c0 in range(0, h.shape[0], chunk):
        logits = h[c0:c0 + chunk] @ w.t()
        target = labels[c0:c0 + chunk]
        counted = target != -100
        lse = torch.logsumexp(logits, 1)
        picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
        loss += torch.where(counted, lse - picked, torch.zeros_like(lse)).sum()
        grad = torch.softmax(logits, 1)
        grad[torch.arange(grad.shape[0], device=h.device), target.clamp(min=0)] -= 1
        grad *= counted[:, None]
        grad_h[c0:c0 + chunk] = grad @ w
        grad_w += grad.t() @ h[c0:c0 + chunk]
    return loss, grad_h, grad_w


def bench_correctness(args, device, dtype):
    """Every kernel in ``dtype`` (bf16 by default) against the fp32 reference on the same rounded
    inputs, at --tokens packed tokens of mixed documents: outputs and input gradients."""
    total, heads_q, heads_kv, head_dim = args.tokens, args.heads, args.kv_heads, args.head_dim
    lengths = document_lengths(total, "mixed")
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows: list[Row] = []

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def compare(op, ours_fn, reference_fn, inputs, names):
        low = [t.detach().requires_grad_() for t in inputs]
        high = [t.detach().float().requires_grad_() for t in inputs]
        got, expected = ours_fn(*low), reference_fn(*high)
        cotangent = torch.randn(got.shape, generator=gen).to(device)
        got_grads = torch.autograd.grad(got, low, cotangent.to(got.dtype))
        expected_grads = torch.autograd.grad(expected, high, cotangent.to(expected.dtype))
        for name, a, b in [("out", got, expected), *((f"d {n}", a, b) for n, a, b in
                                                    zip(names, got_grads, expected_grads))]:
            rows.append(Row(op, f"ours {str(dtype).replace('torch.', '')} vs fp32 reference", name,
                            extra=relative_errors(a, b)))
        del got, expected, got_grads, expected_grads

    longest = max(lengths)
    compare("attention", lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest, impl="ours")[0],
            lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest, impl="torch")[0],
            [rand(total, heads_q, head_dim), rand(total, heads_kv, head_dim), rand(total, heads_kv, head_dim)],
            ("q", "k", "v"))
    compare("rmsnorm", lambda x, w: rms_norm(x, w, impl="ours"), lambda x, w: rms_norm(x, w, impl="torch"),
            [rand(total, args.hidden), rand(args.hidden, scale=0.1) + 1], ("x", "weight"))
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    compare("rope", lambda x: apply_rope(x, positions, 500000.0, impl="ours"),
            lambda x: apply_rope(x, positions, 500000.0, impl="torch"), [rand(total, heads_q, head_dim)], ("x",))
    compare("swiglu", lambda x: swiglu(x, impl="ours"), lambda x: swiglu(x, impl="torch"), [rand(total, 2 * args.ffn)],
            ("gate_up",))
    # fused linear + cross-entropy: loss and both gradients against an independent fp32 formula
    hidden, weight = rand(total, args.hidden, scale=args.hidden ** -0.5), rand(args.vocab, args.hidden)
    labels = torch.randint(0, args.vocab, (total,), generator=gen).to(device)
    labels[::10] = -100
    hidden.requires_grad_(), weight.requires_grad_()
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, impl="ours")
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    expected = _fp32_linear_ce(hidden, weight, labels)
    op, who = "linear-ce", f"ours {str(dtype).replace('torch.', '')} vs fp32 reference"
    for name, a, b in (("loss", loss, expected[0]), ("d hidden", grad_h, expected[1]), ("d weight", grad_w, expected[2])):
        rows.append(Row(op, who, name, extra=relative_errors(a, b)))
    return rows, dict(tokens=total, documents=len(lengths), longest=longest, dtype=str(dtype))


BENCHES = {"attention": bench_attention, "linear-ce": bench_linear_ce, "rmsnorm": bench_rmsnorm,
           "rope": bench_rope, "swiglu": bench_swiglu, "attention-tiles": bench_attention_tiles,
           "correctness": bench_correctness}
ALL = ("attention", "linear-ce", "rmsnorm", "rope", "swiglu")  # "all": the comparisons with other libraries
SMOKE_SIZES = dict(tokens=96, heads=4, kv_heads=2, head_dim=16, hidden=32, vocab=200, ffn=48, warmup=1, iters=2)


def format_table(rows: list[Row]) -> str:
    """Markdown: one line per candidate and pass, with ratios to our kernel's time from this run."""
    ours_ms = {}  # the first "ours" row of each op and pass (in a tile sweep: the default tiles)
    for r in rows:
        if r.candidate.startswith(("ours", "reference (ours")) and r.ms:
            ours_ms.setdefault((r.op, r.pass_), r.ms)
    peak_tflops, peak_gbps = device_peaks()
    lines = ["| op | candidate | pass | ms | ms / ours ms (>1: ours faster) | peak MiB | "
             f"TFLOP/s (% of {peak_tflops:.0f}) | GB/s (% of {peak_gbps:.0f}) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ours_ms.get((r.op, r.pass_))
        ratio = f"{r.ms / base:.2f}x" if r.ms and base else ""
        tflops = f"{r.tflops:.1f} ({100 * r.tflops / peak_tflops:.0f}%)" if r.tflops else ""
        gbps = f"{r.gbps:.0f} ({100 * r.gbps / peak_gbps:.0f}%)" if r.gbps else ""
        note = r.note + "".join(f" {k}={v:.3g}" for k, v in r.extra.items())
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else ""
        lines.append(f"| {r.op} | {r.candidate} | {r.pass_} | {f'{r.ms:.3f}' if r.ms else ''} | {ratio} | {peak} "
                     f"| {tflops} | {gbps} | {note.strip()} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=[*BENCHES, "all"])
    parser.add_argument("--smoke", action="store_true", help="CPU-sized check that the script runs (no timings worth keeping)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--tokens", type=int, default=65536, help="packed tokens (attention, norm, rope, swiglu)")
    parser.add_argument("--docs", choices=["mixed", "single"], default="mixed", help="document lengths of the packed sequence")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--with-reference", action="store_true", help="also time the plain reference attention (slow)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to debug the script (with TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.jsonl"), help="JSON lines file appended to")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE_SIZES.items():
            setattr(args, name, value)
        args.dtype = "fp32"
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: bench.py {args.op} measures a GPU; on a CPU use --smoke, or --device cpu "
              "with TRITON_INTERPRET=1 and toy sizes", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    all_rows, configs = [], {}
    for op in (ALL if args.op == "all" else [args.op]):
        rows, config = BENCHES[op](args, device, dtype)
        all_rows += rows
        configs[op] = config
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "command": " ".join(["python", "bench/kernels/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "configs": configs,
        "rows": [r.__dict__ for r in all_rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"device: {device_name}   date: {record['date']}   command: {record['command']}")
    for op, config in configs.items():
        print(f"{op}: {config}")
    print(format_table(all_rows))
    failed = [r for r in all_rows if r.note.startswith("failed")]
    return 1 if args.smoke and failed else 0


if __name__ == "__main__":
    sys.exit(main())
