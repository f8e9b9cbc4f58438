"""Compile every Triton kernel for an H100 (sm_90) without a GPU, with the launch configurations
the Python wrappers use, and check each fits in shared memory.

The CPU interpreter runs the kernels' arithmetic but not Triton's compiler: type errors of compiled
mode, tl.dot shape limits and shared-memory overflows only show up here. Triton ships ptxas, so
this needs no CUDA driver. Run with TRITON_INTERPRET unset (the tests start it in a subprocess):

    python tests/csrc/compile_for_h100.py [--quick]     # --quick: attention in bf16 hdim 128 only

Prints one line per kernel and exits 1 if any fails.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from csrc.attention import triton_kernels as attention  # noqa: E402
from csrc.linear_cross_entropy import triton_kernels as linear_ce  # noqa: E402
from csrc.rmsnorm import triton_kernels as rmsnorm  # noqa: E402
from csrc.rope import triton_kernels as rope  # noqa: E402
from csrc.swiglu import triton_kernels as swiglu  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block can opt into on sm_90
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_kernel(kernel, arg_type, constexprs: dict, **options):
    """Compile kernel for sm_90; arg_type(name) gives the Triton type of each runtime argument."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=H100, options=options)


def by_name(data: str, **special: str):
    """Type lookup: data pointers (capitalized names) are *data, listed names get their own type,
    everything else is an i32 scalar."""
    def arg_type(name: str) -> str:
        if name in special:
            return special[name]
        return f"*{data}" if name[:1].isupper() or name.startswith("d") and name[1:2].isupper() else "i32"
    return arg_type


def attention_jobs(quick: bool):
    jobs = []
    configs = [(torch.bfloat16, 128)] + ([] if quick else [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 128)])
    for dtype, head_dim in configs:
        blocks = attention.default_blocks(head_dim, dtype, interpreting=False)
        data = TRITON_TYPE[dtype]
        types = by_name(data, Lse="*fp32", Delta="*fp32", dLse="*fp32", cu_seqlens_q="*i32", cu_seqlens_k="*i32",
                        block_doc="*i32", block_row="*i32", qk_scale_log2="fp32", softmax_scale="fp32")
        common = dict(GROUP=4, HEAD_DIM=head_dim, CAUSAL=True, DOT_FP32=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
        tag = f"{data} hdim {head_dim}"
        jobs += [
            (f"attention fwd {tag}", attention._attn_fwd_kernel, types,
             dict(common, BLOCK_M=blocks["fwd_m"], BLOCK_N=blocks["fwd_n"]),
             dict(num_warps=blocks["warps_fwd"], num_stages=blocks["stages"])),
            (f"attention dq {tag}", attention._attn_bwd_dq_kernel, types,
             dict(common, BLOCK_M=blocks["dq_m"], BLOCK_N=blocks["dq_n"]),
             dict(num_warps=blocks["warps_bwd"], num_stages=blocks["stages"])),
            (f"attention dkdv {tag}", attention._attn_bwd_dkdv_kernel, types,
             dict(common, BLOCK_M=blocks["dkdv_m"], BLOCK_N=blocks["dkdv_n"]),
             dict(num_warps=blocks["warps_bwd"], num_stages=blocks["stages"])),
            (f"attention delta {tag}", attention._bwd_delta_kernel, types, dict(HAS_DLSE=True, HEAD_DIM=head_dim, BLOCK_T=64), {}),
        ]
    return jobs


def elementwise_jobs():
    ce_types = by_name("bf16", TargetCol="*i64", Counted="*i8", Loss="*fp32", Stats="*fp32", Lse="*fp32")
    block_v = linear_ce._block_v(128256)
    rope_types = by_name("bf16", Cos="*fp32", Sin="*fp32", Positions="*i64", InvFreq="*fp32")
    return [
        ("linear-ce fused", linear_ce._ce_fused_kernel, ce_types, dict(BLOCK_V=block_v), {}),
        ("linear-ce stats", linear_ce._ce_stats_kernel, ce_types, dict(BLOCK_V=block_v), {}),
        ("linear-ce grad", linear_ce._ce_grad_kernel, ce_types, dict(BLOCK_V=block_v), {}),
        ("rmsnorm fwd", rmsnorm._rms_norm_fwd_kernel, by_name("bf16", W="*fp32", Rstd="*fp32", eps="fp32"),
         dict(BLOCK_H=4096), dict(num_warps=16)),
        ("rmsnorm bwd", rmsnorm._rms_norm_bwd_kernel, by_name("bf16", W="*fp32", Rstd="*fp32", dW_partial="*fp32"),
         dict(BLOCK_H=4096), dict(num_warps=16)),
        ("rope positions", rope._rope_kernel, rope_types,
         dict(FROM_POSITIONS=True, INVERSE=False, BLOCK_H=32, BLOCK_HALF=64, BLOCK_PASS=0), {}),
        ("rope cos/sin + pass-through", rope._rope_kernel, rope_types,
         dict(FROM_POSITIONS=False, INVERSE=True, BLOCK_H=32, BLOCK_HALF=32, BLOCK_PASS=64), {}),
        ("swiglu fwd", swiglu._swiglu_fwd_kernel, by_name("bf16"), dict(BLOCK=swiglu.BLOCK), {}),
        ("swiglu bwd", swiglu._swiglu_bwd_kernel, by_name("bf16"), dict(BLOCK=swiglu.BLOCK), {}),
    ]


def main() -> int:
    quick = "--quick" in sys.argv
    failures = 0
    for name, kernel, types, constexprs, options in attention_jobs(quick) + elementwise_jobs():
        start = time.perf_counter()
        try:
            compiled = compile_kernel(kernel, types, constexprs, **options)
        except Exception as error:
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[:300]}")
            failures += 1
            continue
        shared = compiled.metadata.shared
        fits = shared <= H100_SHARED_BYTES
        failures += not fits
        print(f"{'ok  ' if fits else 'FAIL'} {name}: {shared} B shared{'' if fits else ' > 227 KiB'}, "
              f"{time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
