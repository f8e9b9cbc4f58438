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

from engine.model.kernels import KernelChoices
from engine.parallel.layout_check import DEFAULT_TOLERANCE, compare_runs
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
        "flash-attn", "ours", "ours", "ours", "fused")
    assert KernelChoices.parse("cross-entropy=megatron").cross_entropy == "megatron"


@pytest.mark.parametrize("spec, message", [
    ("rmsnorm=apex", "rmsnorm='apex' is not one of ('auto', 'ours', 'torch')"),
    ("cross_entropy=ours", "cross_entropy='ours' is not one of ('auto', 'fused', 'megatron')"),
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


@pytest.mark.parametrize("spec, message", [
    ("attention=flash-attn", "flash-attn needs a CUDA device"),
    ("attention=transformer-engine", "transformer-engine needs a CUDA device"),
    ("attention=ours", "our Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for tests)"),
    ("rope=ours", "rope='ours' needs our Triton kernels, which cannot run on cpu"),
    ("cross_entropy=fused", "use cross_entropy='megatron' or 'auto'"),
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
        [sys.executable, "-m", "engine.parallel.layout_check", "--kernels", "attention=flash-attn",
         "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "flash-attn needs a CUDA device" in result.stderr
    assert not list(tmp_path.iterdir())


# ---- the layer spec: each choice lands in its slot ----

def test_layer_spec_slots_follow_the_choices(monkeypatch):
    # Specs resolve their choices for this machine; "ours" resolves on CPU under the interpreter
    # (only the environment is read here: nothing imports triton).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from megatron.core.transformer.attention import SelfAttention

    from engine.model.attention import (
        DocumentMaskedAttention,
        RotaryKernelSelfAttention,
        TransformerEngineDocumentAttention,
    )
    from engine.model.kernels import SwiGLU
    from engine.model.specs import core_attention_spec, llama_block_spec, llama_layer_spec

    ours = llama_layer_spec(kernels=KernelChoices.parse("all=ours"))
    layer = ours.submodules
    assert layer.input_layernorm.params == {"impl": "triton"}
    assert layer.self_attention.module is RotaryKernelSelfAttention
    assert layer.self_attention.params["rope_impl"] == "triton"
    assert layer.self_attention.submodules.core_attention.module is DocumentMaskedAttention
    assert layer.self_attention.submodules.core_attention.params == {"backend": "ours"}
    assert layer.mlp.submodules.activation_func.module is SwiGLU
    assert layer.mlp.submodules.activation_func.params == {"impl": "triton"}

    plain = llama_layer_spec(kernels=KernelChoices.parse("all=torch")).submodules
    assert plain.input_layernorm.params == {"impl": "reference"}
    # Checkpoint keys as transformer-engine's fused norm-linears name them (megatron's mapping).
    assert plain.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert plain.self_attention.module is SelfAttention
    assert plain.mlp.submodules.activation_func is None  # megatron's own gated silu

    # Resolving "transformer-engine" needs CUDA; the slot it fills is core_attention_spec's.
    assert core_attention_spec("transformer-engine").module is TransformerEngineDocumentAttention
    block = llama_block_spec(2, kernels=KernelChoices.parse("all=ours"))
    assert block.layer_norm.params == {"impl": "triton"} and len(block.layer_specs) == 2


def test_config_and_model_must_agree_on_swiglu(monkeypatch):
    """use_te_activation_func is megatron's switch for a module activation; a mismatch with the
    spec would apply silu to the whole [gate; up] tensor, so it is refused."""
    from engine.model.build import build_model_chunks, transformer_config
    from engine.model.config import get_model_config
    from engine.parallel.layout import ParallelLayout

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = get_model_config("tiny-hd64")
    config = transformer_config(model, ParallelLayout(), kernels=KernelChoices.parse("all=ours"))
    assert config.use_te_activation_func
    assert not transformer_config(model, ParallelLayout()).use_te_activation_func
    with pytest.raises(ValueError, match="using the same kernels as build_model_chunks"):
        build_model_chunks(model, config, kernels=KernelChoices.parse("all=torch"))


# ---- single modules against megatron / the reference, in process (plain-PyTorch impls) ----

def test_rope_in_self_attention_matches_megatrons_rope():
    """RotaryKernelSelfAttention's rotation (rotate_by_angles) equals megatron's RoPE on the
    model's angles; the Triton impl of the same call runs in the all-ours training run."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from engine.model.attention import PerTokenRotaryEmbedding, rotate_by_angles

    seq, batch, heads, dim = 7, 3, 4, 64
    rope = PerTokenRotaryEmbedding(dim, base=500_000.0)
    rope.positions = torch.randint(0, 5000, (batch, seq))
    angles = rope()
    x = torch.randn(seq, batch, heads, dim, dtype=torch.float64)
    expected = _apply_rotary_pos_emb_bshd(x, angles.double())
    torch.testing.assert_close(rotate_by_angles(x, angles.double(), "reference"), expected,
                               rtol=1e-12, atol=1e-12)


def test_swiglu_activation_module_matches_megatrons_gated_silu_and_checkpoints():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engine.model.kernels import SwiGLU

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    activation = SwiGLU(config, impl="reference")
    gate_up = torch.randn(5, 2, 12, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(activation(gate_up), torch.nn.functional.silu(gate) * up)
    # megatron's MLP calls every child's sharded_state_dict when checkpointing (it needs the
    # parallel groups, so it is not called here); a MegatronModule has one, and no parameters.
    from megatron.core.transformer.module import MegatronModule

    assert isinstance(activation, MegatronModule) and not list(activation.parameters())


def test_flash_attn_backend_wiring_with_a_stand_in(monkeypatch):
    """flash-attn needs a GPU; a stand-in with its varlen signature (computing with our
    reference) checks the layout conversion and arguments DocumentMaskedAttention passes."""
    import types

    import engine.model.attention as attention_module
    from csrc.attention import reference_varlen_attention
    from engine.model.attention import DocumentMaskedAttention

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale,
                               causal, return_attn_probs):
        calls.append((q.shape, cu_q.tolist(), max_q, dropout_p, causal))
        out, lse = reference_varlen_attention(q, k, v, cu_q, cu_k, softmax_scale, causal)
        return out, lse, None

    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    monkeypatch.setattr(attention_module, "select_attention_backend", lambda requested, device: requested)
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron.core.transformer.transformer_config import TransformerConfig

    seq, batch, heads, kv_heads, dim = 6, 2, 4, 2, 16
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=kv_heads)
    q = torch.randn(seq, batch, heads, dim)
    k, v = torch.randn(2, seq, batch, kv_heads, dim)
    cu = torch.tensor([0, 2, 6, 7, 12], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=5, max_seqlen_kv=5)
    outputs = {}
    for backend in ("flash-attn", "torch"):
        module = DocumentMaskedAttention(config, layer_number=1, softmax_scale=0.3,
                                         backend=backend)
        outputs[backend] = module(q, k, v, packed_seq_params=packed)
    assert calls == [((batch * seq, heads, dim), [0, 2, 6, 7, 12], 5, 0.0, True)]
    assert outputs["flash-attn"].shape == (seq, batch, heads * dim)
    torch.testing.assert_close(outputs["flash-attn"], outputs["torch"], rtol=0, atol=0)


# ---- training runs: our kernels against the reference ----

@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """model name -> its single-process all-PyTorch run (made on first use)."""
    runs = {}

    def get(model: str):
        if model not in runs:
            out = tmp_path_factory.mktemp(f"kernels_torch_{model}")
            torchrun("engine.parallel.layout_check", 1,
                     ["--model", model, *RUN, "--kernels", "all=torch", "--out", str(out)])
            runs[model] = out
        return runs[model]

    return get


KERNEL_RUNS = {
    # name: (processes, model, flags); each must match the single-process all-torch run.
    # tiny-hd64 (head dim 64, 1 KV head) for our attention kernel; tiny (2 KV heads) splits
    # over TP2 for the fused cross-entropy on vocabulary shards, with and without SP.
    "all_ours": (1, "tiny-hd64", ["--kernels", "all=ours"]),
    "fused_ce_tp2_sp": (2, "tiny", ["--tp", "2", "--sp", "--kernels", "cross_entropy=fused"]),
    "fused_ce_tp2": (2, "tiny", ["--tp", "2", "--kernels", "cross_entropy=fused"]),
}


@pytest.mark.parametrize("name", list(KERNEL_RUNS))
def test_training_with_our_kernels_matches_reference(name, reference_runs, tmp_path):
    nproc, model, flags = KERNEL_RUNS[name]
    torchrun("engine.parallel.layout_check", nproc,
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
