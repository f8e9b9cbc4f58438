"""Compile every Triton kernel for Hopper (sm_90) and Ampere (sm_80) without a GPU, exactly as the
wrappers launch it, and check shared memory and register spills against the card's limits.

The wrappers themselves run (the custom ops' real bodies) on meta tensors of Llama-3-8B shapes in
bf16 (head dim 128, 32 query / 8 KV heads, hidden 4096, FFN 14336, vocabulary 128,256, 64K
tokens, tensor parallel 1 and 4). A stand-in Triton driver reports the target GPU, and every
``kernel[grid](...)`` compiles instead of launching: the run-time specializations (16-byte
alignment of pointers, divisibility by 16 and value 1 of integers, taken from the real
arguments; meta tensors have 16-byte aligned base addresses like CUDA allocations, and views keep
their byte offsets), the constexprs, num_warps and num_stages are the launch's own. ptxas (bundled
with Triton, no driver needed) reports registers and spills; shared memory is what the launch
requests.

    python tests/csrc/compile_for_gpu.py [--arch 90 --arch 80]

Prints one line per compiled kernel and exits 1 if any fails a check. Run with TRITON_INTERPRET
unset and a cold TRITON_CACHE_DIR (the test does both).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output (registers, spills) printed per compile

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Per-block shared memory a kernel may opt into, and the spill budget per thread.
LIMITS = {
    90: dict(card="H100", shared=232448, spill=256),  # 227 KiB
    80: dict(card="A100", shared=166912, spill=1024),  # 163 KiB
}
TOKENS, HEAD_DIM, HEADS_Q, HEADS_KV, HIDDEN, FFN, VOCAB = 65536, 128, 32, 8, 4096, 14336, 128256
DOC_LENGTHS = (40000, 16384, 6000, 3000, 152)  # a ProLong-like mix of 64K tokens


class StandInDriver:
    """What Triton's JIT asks of a driver before a launch: the target, a device and a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch  # one JIT cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class CompileInsteadOfLaunch:
    """kernel[grid](...) compiles (warmup) and records the kernel with ptxas's report."""

    def __init__(self):
        self.records: list[tuple[str, object, str, float | None]] = []  # seconds None: cached
        self.logs: dict[int, str] = {}
        self.label = ""

    def __enter__(self):
        recorder = self
        self._original = JITFunction.__getitem__

        def compile_only(kernel, grid):
            def launch(*args, **kwargs):
                captured = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(captured):
                    compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
                log = captured.getvalue()
                # The same specialization again comes from Triton's cache with an empty log:
                # report the log of its first compile.
                seconds = None if id(compiled) in recorder.logs else time.perf_counter() - start
                log = recorder.logs.setdefault(id(compiled), log)
                recorder.records.append((f"{recorder.label} {kernel.fn.__name__}", compiled, log, seconds))
            return launch

        JITFunction.__getitem__ = compile_only
        return self

    def __exit__(self, *exc):
        JITFunction.__getitem__ = self._original


def spill_bytes(ptxas_log: str) -> int:
    """Bytes of spill stores per thread that ptxas reported (0 if none)."""
    found = re.findall(r"(\d+) bytes spill stores", ptxas_log)
    return max(map(int, found)) if found else 0


def registers(ptxas_log: str) -> int:
    found = re.findall(r"Used (\d+) registers", ptxas_log)
    return max(map(int, found)) if found else -1


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def run_wrappers(recorder: CompileInsteadOfLaunch, tp: int) -> None:
    """Call each custom op's real body (not its fake) on meta tensors, as the engine calls them."""
    from csrc.attention.triton_kernels import TILE_KEYS, default_blocks, varlen_attention_backward, varlen_attention_forward
    from csrc.linear_cross_entropy.triton_kernels import _chunk_loss_and_grad
    from csrc.rmsnorm.triton_kernels import rms_norm_backward, rms_norm_forward
    from csrc.rope.triton_kernels import rope
    from csrc.swiglu.triton_kernels import swiglu_backward, swiglu_forward

    arch = driver.active.get_current_target().arch
    heads_q, heads_kv = HEADS_Q // tp, HEADS_KV // tp
    # q, k, v as the attention layer hands them over: views of one fused QKV projection output
    qkv = meta(TOKENS, (heads_q + 2 * heads_kv) * HEAD_DIM).view(TOKENS, heads_q + 2 * heads_kv, HEAD_DIM)
    q, k, v = qkv.split([heads_q, heads_kv, heads_kv], dim=1)
    cu = torch.empty(len(DOC_LENGTHS) + 1, dtype=torch.int32, device="meta")
    blocks = default_blocks(HEAD_DIM, torch.bfloat16, interpreting=False, arch=arch)
    tiles = [blocks[key] for key in TILE_KEYS]
    recorder.label = f"tp{tp} attention"
    out, lse = varlen_attention_forward._init_fn(q, k, v, cu, cu, 0.088, True, tiles)
    varlen_attention_backward._init_fn(torch.empty_like(out), None, q, k, v, out, lse, cu, cu, 0.088, True, tiles)
    varlen_attention_backward._init_fn(torch.empty_like(out), torch.empty_like(lse), q, k, v, out, lse, cu, cu,
                                       0.088, True, tiles)

    recorder.label = f"tp{tp} linear-ce"
    chunk = 1024
    logits = meta(chunk, VOCAB // tp)
    target_col = torch.empty(TOKENS, dtype=torch.int64, device="meta")[chunk:2 * chunk]
    counted = torch.empty(TOKENS, dtype=torch.bool, device="meta")[chunk:2 * chunk]
    _chunk_loss_and_grad(logits, target_col, counted, tp_group=None if tp == 1 else _fake_group(tp))

    recorder.label = f"tp{tp} rmsnorm"
    x = meta(TOKENS // tp, HIDDEN)  # sequence parallel: each rank normalizes its tokens
    weight = meta(HIDDEN)
    y, rstd = rms_norm_forward._init_fn(x, weight, 1e-5)
    rms_norm_backward._init_fn(torch.empty_like(y), x, weight, rstd)

    recorder.label = f"tp{tp} swiglu"
    gate_up = meta(TOKENS, 2 * FFN // tp)
    swiglu_backward._init_fn(swiglu_forward._init_fn(gate_up), gate_up)

    recorder.label = f"tp{tp} rope"
    positions = torch.empty(TOKENS, dtype=torch.int64, device="meta")
    inv_freq = torch.empty(HEAD_DIM // 2, device="meta")
    rope._init_fn(q, HEAD_DIM // 2, None, None, positions, inv_freq, False)
    cos = torch.empty(TOKENS, HEAD_DIM // 2, device="meta")
    rope._init_fn(k, HEAD_DIM // 2, cos, cos, None, None, True)


_GROUPS: dict[int, object] = {}


def _fake_group(world_size: int):
    """A process group whose collectives accept meta tensors (no communication)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size not in _GROUPS:
        if not dist.is_initialized():
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        _GROUPS[world_size] = dist.group.WORLD
    return _GROUPS[world_size]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(LIMITS),
                        help="compute capability major x 10 (default: 90 and 80)")
    parser.add_argument("--tp", type=int, action="append", choices=(1, 4), help="tensor-parallel size (default: 1 and 4)")
    args = parser.parse_args()
    failures = 0
    for arch in args.arch or (90, 80):
        limits = LIMITS[arch]
        driver.set_active(StandInDriver(arch))
        with CompileInsteadOfLaunch() as recorder:
            for tp in args.tp or (1, 4):
                run_wrappers(recorder, tp)
            for name, compiled, log, seconds in recorder.records:
                shared, spills, regs = compiled.metadata.shared, spill_bytes(log), registers(log)
                problems = []
                if shared > limits["shared"]:
                    problems.append(f"shared {shared} B > {limits['shared']} B")
                if spills > limits["spill"]:
                    problems.append(f"spills {spills} B > {limits['spill']} B")
                if "C7512" in log or "C7515" in log:  # wgmma serialized for want of registers
                    problems.append("ptxas serialized wgmma (C7512/C7515)")
                failures += bool(problems)
                print(f"{'FAIL' if problems else 'ok  '} sm_{arch} {name}: warps {compiled.metadata.num_warps}, "
                      f"stages {compiled.metadata.num_stages}, {regs} registers, {spills} B spilled, "
                      f"{shared} B shared (limit {limits['shared']} on {limits['card']}), "
                      + ("same specialization as above" if seconds is None else f"compiled in {seconds:.1f} s")
                      + (f"  <- {'; '.join(problems)}" if problems else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
