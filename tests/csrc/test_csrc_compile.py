"""What can be checked of the GPU build without a GPU: Triton kernels compile for sm_90 and fit in
shared memory (Triton's bundled ptxas, no driver needed), and the CUDA source compiles with nvcc."""
import os
import shutil
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
def test_triton_kernels_compile_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compile
    result = subprocess.run([sys.executable, "tests/csrc/compile_for_h100.py", "--quick"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("ok ") >= 13, result.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles(tmp_path):
    result = subprocess.run(
        ["nvcc", "-O3", "-arch=sm_90", "-c", str(REPO / "csrc/swiglu/swiglu.cu"), "-o", str(tmp_path / "swiglu.o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "swiglu.o").stat().st_size > 0
