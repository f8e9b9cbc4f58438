"""What can be checked of the GPU build without a GPU: every Triton kernel, launched by its wrapper
at Llama-3-8B shapes (TP 1 and 4), compiles for sm_90 and sm_80 within the card's shared memory and
register-spill budget (tests/csrc/compile_for_gpu.py: a stand-in driver, Triton's bundled ptxas)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bundled_ptxas() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends/nvidia/bin/ptxas").exists()


@pytest.mark.skipif(not _bundled_ptxas(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_triton_kernels_compile_for_hopper_and_ampere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compile
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "tests/csrc/compile_for_gpu.py"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for arch in (90, 80):
        for kernel in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_bwd_delta_kernel",
                       "_ce_fused_kernel", "_ce_stats_kernel", "_ce_grad_kernel", "_rms_norm_fwd_kernel",
                       "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_rope_kernel"):
            assert any(line.startswith(f"ok   sm_{arch} ") and kernel in line for line in lines), (
                f"sm_{arch} {kernel} was not compiled:\n{result.stdout}")
    assert not any(line.startswith("FAIL") for line in lines), result.stdout

