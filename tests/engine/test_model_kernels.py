"""Our kernels inside the model: chosen by config, wired through the layer spec, and a training
run with them matches the plain-PyTorch reference run.

The end-to-end checks run the user-facing layout checker (``--kernels``) under torchrun; on CPU
the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1), at the smallest model
our attention kernel takes (``tiny-hd64``: head dim 64). Tolerance: fp32 through the interpreter,
relative error of loss, grad norm and every weight after 2 steps <= 1e-5 (layout_check's default).
"""
import json
import subprocess
import sys

import pytest
import torch

from engine.model.kernel_choices import KernelChoices
from engine.tools.layout_check import DEFAULT_TOLERANCE, compare_runs
from tests.distributed import REPO, test_env, torchrun

# Two sequences of 32 tokens, one per micro-batch, 2 steps: the interpreter is slow.
RUN = ["--global-batch", "2", "--seq-length", "32"]
# Without a GPU our Triton kernels run through the interpreter (set before triton is imported).
TRITON_ENV = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}


# ---- configuration: validation names the value and the fix, before any process group ----

def test_kernel_choices_parse_and_presets():
    assert KernelChoices.parse("") == KernelChoices()
    ours = KernelChoices.parse("all=ours,attention=flash-attn")
    assert (ours.attention, ours.rmsnorm, ours.rope, ours.swiglu, ours.cross_entropy) == (
        "flash-attn", "ours", "ours", "ours", "ours")
    assert KernelChoices.parse("cross-entropy=torch").cross_entropy == "torch"
    assert KernelChoices.parse("all=torch") == KernelChoices("torch", "torch", "torch", "torch",
                                                             "torch")


@pytest.mark.parametrize("spec, message", [
    ("rmsnorm=apex", "rmsnorm='apex' is not one of ('auto', 'ours', 'torch')"),
    ("cross_entropy=fused", "cross_entropy='fused' is not one of ('auto', 'ours', 'torch')"),
    ("attention=xformers", "attention='xformers' is not one of"),
    ("softmax=ours", "unknown field 'softmax'"),
    ("attention", "is not field=value"),
])
def test_bad_kernel_choices_are_refused(spec, message):
    with pytest.raises(ValueError) as info:
        KernelChoices.parse(spec)
    assert message in str(info.value)


def test_auto_is_ours_on_cuda_and_pytorch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert KernelChoices().resolve("cpu") == KernelChoices.parse("all=torch")
    # Resolution reads only the device type and whether triton is installed: no GPU needed.
    assert KernelChoices().resolve("cuda") == KernelChoices.parse("all=ours")


def test_auto_attention_on_a_gpu_falls_back_for_a_head_dimension_our_kernel_lacks(monkeypatch):
    """The quickstart model (head dim 32) on a GPU: "auto" must not pick our kernel, which
    takes head dim 64 or 128 (the dry run of examples/quickstart failed there)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert KernelChoices().resolve("cuda", head_dim=128).attention == "ours"
    assert KernelChoices().resolve("cuda", head_dim=32).attention == "torch"  # no flash-attn
    assert KernelChoices().resolve("cuda", head_dim=32).rmsnorm == "ours"
    with pytest.raises(ValueError, match="attention='ours' takes head dimensions"):
        KernelChoices(attention="ours").resolve("cuda", head_dim=32)


@pytest.mark.parametrize("spec, message", [
    ("attention=flash-attn", "flash-attn needs a CUDA device"),
    ("attention=transformer-engine", "transformer-engine needs a CUDA device"),
    ("attention=ours", "our Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for tests)"),
    ("rope=ours", "rope='ours' needs our Triton kernels, which cannot run on cpu"),
    ("cross_entropy=ours", "use cross_entropy='torch' or 'auto'"),
])
def test_kernels_that_cannot_run_on_cpu_fail_before_process_groups(spec, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError) as info:
        KernelChoices.parse(spec).resolve("cpu")
    assert message in str(info.value)


def test_layout_check_refuses_a_gpu_only_kernel_at_argument_parsing(tmp_path):
    """The user entry fails in its argument parser, not after torchrun set up process groups."""
    env = test_env()
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "engine.tools.layout_check", "--kernels", "attention=flash-attn",
         "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "flash-attn needs a CUDA device" in result.stderr
    assert not list(tmp_path.iterdir())


# ---- the layer spec: each choice lands in its slot ----

def test_layer_spec_slots_follow_the_choices():
    from megatron.core.transformer.attention import SelfAttention

    from engine.model.attention import (
        DocumentMaskedAttention,
        RotaryKernelSelfAttention,
        TransformerEngineDocumentAttention,
    )
    from engine.model.specs import core_attention_spec, llama_block_spec, llama_layer_spec
    from engine.model.swiglu import SwiGLU

    ours = KernelChoices.parse("all=ours")  # already concrete: nothing resolves here
    layer = llama_layer_spec(ours, core_attention_spec(ours.attention)).submodules
    assert layer.input_layernorm.params == {"impl": "ours"}
    assert layer.self_attention.module is RotaryKernelSelfAttention
    assert layer.self_attention.params["rope_impl"] == "ours"
    assert layer.self_attention.submodules.core_attention.module is DocumentMaskedAttention
    assert layer.self_attention.submodules.core_attention.params == {"backend": "ours"}
    assert layer.mlp.submodules.activation_func.module is SwiGLU
    assert layer.mlp.submodules.activation_func.params == {"impl": "ours"}

    torch_kernels = KernelChoices.parse("all=torch")
    plain = llama_layer_spec(torch_kernels, core_attention_spec("torch")).submodules
    assert plain.input_layernorm.params == {"impl": "torch"}
    # Checkpoint keys as transformer-engine's fused norm-linears name them (megatron's mapping).
    assert plain.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert plain.self_attention.module is SelfAttention
    assert plain.mlp.submodules.activation_func is None  # megatron's own gated silu

    assert core_attention_spec("transformer-engine").module is TransformerEngineDocumentAttention
    block = llama_block_spec(2, ours, core_attention_spec("ours"))
    assert block.layer_norm.params == {"impl": "ours"} and len(block.layer_specs) == 2
    with pytest.raises(ValueError, match="needs resolved kernels"):
        llama_layer_spec(KernelChoices(), core_attention_spec("torch"))


def test_megatron_config_follows_the_plans_kernels():
    """use_te_activation_func is megatron's switch for a module activation; it comes from the
    same resolved kernels as the layer spec (one plan), so the two cannot disagree."""
    from engine.model.config import get_model_config
    from engine.parallel.layout import ParallelLayout
    from engine.training.build import transformer_config
    from engine.training.run_plan import RunPlan

    model = get_model_config("tiny-hd64")
    for spec, expected in (("all=ours", True), ("all=torch", False), ("swiglu=ours", True)):
        plan = RunPlan(model, ParallelLayout(), KernelChoices.parse(spec).resolve("cuda"),
                       seq_length=32, global_batch=1)
        assert transformer_config(plan).use_te_activation_func is expected, spec


# ---- single modules against megatron / the reference, in process (plain-PyTorch impls) ----

def test_rope_in_self_attention_matches_megatrons_rope():
    """RotaryKernelSelfAttention's rotation (rotate_by_angles) equals megatron's RoPE on the
    model's angles; the Triton impl of the same call runs in the all-ours training run."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from engine.model.attention import rotate_by_angles
    from engine.model.gpt import PerTokenRotaryEmbedding

    seq, batch, heads, dim = 7, 3, 4, 64
    rope = PerTokenRotaryEmbedding(dim, base=500_000.0)
    rope.positions = torch.randint(0, 5000, (batch, seq))
    angles = rope()
    x = torch.randn(seq, batch, heads, dim, dtype=torch.float64)
    expected = _apply_rotary_pos_emb_bshd(x, angles.double())
    torch.testing.assert_close(rotate_by_angles(x, angles.double(), "torch"), expected,
                               rtol=1e-12, atol=1e-12)


def test_swiglu_activation_module_matches_megatrons_gated_silu_and_checkpoints():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engine.model.swiglu import SwiGLU

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    activation = SwiGLU(config, impl="torch")
    gate_up = torch.randn(5, 2, 12, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(activation(gate_up), torch.nn.functional.silu(gate) * up)
    # megatron's MLP calls every child's sharded_state_dict when checkpointing (it needs the
    # parallel groups, so it is not called here); a MegatronModule has one, and no parameters.
    from megatron.core.transformer.module import MegatronModule

    assert isinstance(activation, MegatronModule) and not list(activation.parameters())


def test_rms_norm_module_marks_its_weight_for_the_sequence_parallel_all_reduce():
    """Under SP each TP rank's norm-weight gradient is a partial sum over its tokens; megatron
    all-reduces it over TP only for parameters marked sequence_parallel."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engine.model.norm import RMSNorm

    for sequence_parallel in (True, False):
        config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                   use_cpu_initialization=True, tensor_model_parallel_size=2,
                                   sequence_parallel=sequence_parallel)
        norm = RMSNorm(config, 16, eps=1e-6, impl="torch")
        assert norm.weight.sequence_parallel is sequence_parallel
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-6)


def test_flash_attn_backend_passes_flash_attns_varlen_arguments(monkeypatch):
    """flash-attn needs a GPU, so a stand-in with flash_attn_varlen_func's signature records the
    call: this checks the arguments DocumentMaskedAttention passes (THD layouts, int32
    cu_seqlens, the longest document, scale, causal, no dropout) and that the output comes back
    in megatron's layout. It does not check flash-attn's numerics (the stand-in computes with
    our reference); the GPU run in bench/kernels does."""
    import types

    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.transformer_config import TransformerConfig

    from csrc.attention import reference_varlen_attention
    from engine.model.attention import DocumentMaskedAttention

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False,
                               return_attn_probs=False):
        calls.append(dict(q=q.shape, k=k.shape, v=v.shape, cu_q=cu_seqlens_q.tolist(),
                          cu_k=cu_seqlens_k.tolist(), cu_dtype=cu_seqlens_q.dtype,
                          max_q=max_seqlen_q, max_k=max_seqlen_k, dropout_p=dropout_p,
                          softmax_scale=softmax_scale, causal=causal,
                          return_attn_probs=return_attn_probs))
        out, lse = reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                              softmax_scale, causal)
        return out, lse, None

    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    seq, batch, heads, kv_heads, dim = 6, 2, 4, 2, 16
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=kv_heads)
    q = torch.randn(seq, batch, heads, dim)
    k, v = torch.randn(2, seq, batch, kv_heads, dim)
    cu = torch.tensor([0, 2, 6, 7, 12], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=5, max_seqlen_kv=5)
    module = DocumentMaskedAttention(config, layer_number=1, softmax_scale=0.3,
                                     backend="flash-attn")
    out = module(q, k, v, packed_seq_params=packed)
    assert calls == [dict(q=(batch * seq, heads, dim), k=(batch * seq, kv_heads, dim),
                          v=(batch * seq, kv_heads, dim), cu_q=[0, 2, 6, 7, 12],
                          cu_k=[0, 2, 6, 7, 12], cu_dtype=torch.int32, max_q=5, max_k=5,
                          dropout_p=0.0, softmax_scale=0.3, causal=True,
                          return_attn_probs=True)]
    assert out.shape == (seq, batch, heads * dim)
    # Sequence b's tokens are rows b*s..(b+1)*s-1 of the THD call: back in [s, b] order.
    reference, _ = reference_varlen_attention(
        q.transpose(0, 1).reshape(-1, heads, dim), k.transpose(0, 1).reshape(-1, kv_heads, dim),
        v.transpose(0, 1).reshape(-1, kv_heads, dim), cu, cu, 0.3, True)
    torch.testing.assert_close(out, reference.reshape(batch, seq, -1).transpose(0, 1))


# ---- training runs: our kernels against the reference ----

@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """model name -> its single-process all-PyTorch run (made on first use)."""
    runs = {}

    def get(model: str):
        if model not in runs:
            out = tmp_path_factory.mktemp(f"kernels_torch_{model}")
            torchrun("engine.tools.layout_check", 1,
                     ["--model", model, *RUN, "--kernels", "all=torch", "--out", str(out)])
            runs[model] = out
        return runs[model]

    return get


KERNEL_RUNS = {
    # name: (processes, model, flags); each must match the single-process all-torch run.
    # tiny-hd64 (head dim 64, 1 KV head) for our attention kernel; tiny (2 KV heads) splits
    # over TP2 for the fused cross-entropy on vocabulary shards, with and without SP.
    "all_ours": (1, "tiny-hd64", ["--kernels", "all=ours"]),
    "fused_ce_tp2_sp": (2, "tiny", ["--tp", "2", "--sp", "--kernels", "cross_entropy=ours"]),
    "fused_ce_tp2": (2, "tiny", ["--tp", "2", "--kernels", "cross_entropy=ours"]),
}


@pytest.mark.parametrize("name", list(KERNEL_RUNS))
def test_training_with_our_kernels_matches_reference(name, reference_runs, tmp_path):
    nproc, model, flags = KERNEL_RUNS[name]
    torchrun("engine.tools.layout_check", nproc,
             ["--model", model, *RUN, *flags, "--out", str(tmp_path)], **TRITON_ENV)
    record = json.loads((tmp_path / "steps.json").read_text())
    # The record names the kernels that ran ("auto" resolved as in the run's environment).
    with pytest.MonkeyPatch.context() as env:
        for key, value in TRITON_ENV.items():
            env.setenv(key, value)
        ran = KernelChoices.parse(flags[-1]).resolve("cuda" if torch.cuda.is_available() else "cpu")
    assert record["kernels"] == ran.describe()
    errors = compare_runs(reference_runs(model), tmp_path)
    assert errors["num_tokens"] == 0
    for key in ("loss", "grad_norm", "weights"):
        assert errors[key] <= DEFAULT_TOLERANCE, (name, key, errors)
    steps = record["steps"]
    assert steps[1]["loss"] < steps[0]["loss"]  # it trained
