"""Attention backend selection: the config names a backend, the layer spec gets a function."""
import subprocess
import sys

import pytest
import torch

from csrc.select import ATTENTION_BACKENDS, select_attention_backend, varlen_attention_function


def test_importing_csrc_imports_no_gpu_library():
    code = (
        "import sys, csrc, csrc.select, csrc.attention, csrc.rmsnorm, csrc.rope, csrc.swiglu, csrc.linear_cross_entropy\n"
        "csrc.select.select_attention_backend('auto', 'cpu')\n"
        "heavy = [m for m in ('triton', 'flash_attn', 'transformer_engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_auto_is_the_torch_reference_on_cpu():
    assert select_attention_backend("auto", "cpu") == "torch"
    assert select_attention_backend("torch", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["flash-attn", "transformer-engine"])
def test_gpu_libraries_refuse_cpu_with_a_reason(backend):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_attention_backend(backend, "cpu")


def test_ours_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA device"):
        select_attention_backend("ours", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_attention_backend("ours", "cpu") == "ours"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="is not one of"):
        select_attention_backend("xformers", "cpu")
    assert ATTENTION_BACKENDS == ("auto", "ours", "flash-attn", "transformer-engine", "torch")


def test_ours_and_torch_functions_agree(device):
    lengths = [5, 12]
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(17, 2, 64, device=device) for _ in range(3))
    out_torch, lse_torch = varlen_attention_function("torch")(q, k, v, cu, cu, max(lengths), max(lengths))
    out_ours, lse_ours = varlen_attention_function("ours")(q, k, v, cu, cu, max(lengths), max(lengths))
    torch.testing.assert_close(out_ours, out_torch, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse_ours, lse_torch, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="TEDotProductAttention"):
        varlen_attention_function("transformer-engine")
