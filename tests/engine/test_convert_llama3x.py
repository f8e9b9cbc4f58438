"""Llama-3.1 and Llama-3.2 checkpoints both ways, against transformers' own implementation.

Random tiny models in the shape of each (no downloads): 3.1-style has llama3 RoPE scaling
(factor 8) and an untied output layer; 3.2-style has llama3 scaling (factor 32), tied embeddings
and an explicit head_dim of twice hidden / heads. original_max_position_embeddings is 32, so
sequences of 128 tokens run far past it and every branch of the scaling (kept, interpolated,
divided frequencies; base 10000 puts some wavelengths between 8 and 32) shows in the logits. Bad inputs of ``engine.convert`` are at the end.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.convert.__main__ import main as convert_main
from engine.convert.export import export_checkpoint
from engine.convert.importer import import_checkpoint
from tests.distributed import torchrun
from tests.engine.llama3x_worker import tokens_for
from tests.engine.test_convert_layouts import read_hf_tensors

QUIET = {"log": lambda *_: None}
ORIGINAL_CONTEXT, SEQ_LENGTH = 32, 128
STYLES = {
    "3.1": dict(factor=8.0, tie_word_embeddings=False, head_dim=None),
    "3.2": dict(factor=32.0, tie_word_embeddings=True, head_dim=32),
}


def llama3x_config(style: str, **changes) -> dict:
    spec = STYLES[style]
    config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=spec["tie_word_embeddings"],
                  bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0,
                                   "factor": spec["factor"], "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": ORIGINAL_CONTEXT})
    if spec["head_dim"]:
        config["head_dim"] = spec["head_dim"]
    config.update(changes)
    return config


def save_llama3x(folder: Path, style: str, seed: int = 0, **changes):
    """save_pretrained a random model of ``style``; returns the transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**llama3x_config(style, **changes)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones by default: random so a swapped norm would show
                param.uniform_(0.5, 1.5)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                # Sharper attention than init's near-uniform one, so positions (RoPE) matter.
                param.mul_(10)
    model.save_pretrained(str(folder))
    return model.eval()


def hf_logits(folder: Path, tokens: torch.Tensor, **config_changes) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(folder), **config_changes)
    model = LlamaForCausalLM.from_pretrained(str(folder), config=config, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3x")
    for style in STYLES:
        save_llama3x(root / f"hf{style}", style)
        import_checkpoint(root / f"hf{style}", root / f"ckpt{style}", **QUIET)
    return root


@pytest.mark.parametrize("style", STYLES)
def test_round_trip_is_bitwise_with_rope_scaling_tie_and_head_dim_kept(models, tmp_path, style):
    from transformers import LlamaForCausalLM

    state = json.loads((models / f"ckpt{style}/step_00000000/engine_state.json").read_text())
    saved = state["model_config"]
    assert saved["rope_scaling"]["factor"] == STYLES[style]["factor"]
    assert saved["untie_embeddings"] is not STYLES[style]["tie_word_embeddings"]
    assert saved["kv_channels"] == STYLES[style]["head_dim"]
    export_checkpoint(models / f"ckpt{style}", tmp_path / "out", dtype="float32", **QUIET)
    original, exported = read_hf_tensors(models / f"hf{style}"), read_hf_tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())
    assert ("lm_head.weight" in exported) is not STYLES[style]["tie_word_embeddings"]
    source = json.loads((models / f"hf{style}/config.json").read_text())
    written = json.loads((tmp_path / "out/config.json").read_text())
    for key in ("rope_parameters", "tie_word_embeddings", "head_dim", "max_position_embeddings"):
        assert written.get(key) == source.get(key), key
    assert written["rope_scaling"]["rope_type"] == "llama3"  # transformers 4 spelling too
    _, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


@pytest.mark.parametrize("style, nproc, layout", [
    ("3.2", 4, ["--tp", "2", "--pp", "2"]),
    ("3.1", 2, ["--cp", "2"]),
])
def test_logits_match_transformers_far_beyond_the_original_context(models, tmp_path, style,
                                                                  nproc, layout):
    torchrun("tests.engine.llama3x_worker", nproc,
             ["--checkpoint", str(models / f"ckpt{style}"), "--out", str(tmp_path),
              "--mode", "logits", "--seq-length", str(SEQ_LENGTH), *layout], timeout=300)
    ours = torch.load(tmp_path / "logits.pt")
    tokens = tokens_for(256, SEQ_LENGTH)[:, :-1]
    assert torch.equal(ours["tokens"], tokens[0])
    theirs = hf_logits(models / f"hf{style}", tokens)
    beyond = slice(2 * ORIGINAL_CONTEXT, None)
    assert (ours["logits"] - theirs).abs().max().item() <= 1e-4
    # The scaling matters where it is checked: plain RoPE at the same base is far off there.
    plain = hf_logits(models / f"hf{style}", tokens,
                      rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    assert (plain[beyond] - theirs[beyond]).abs().max().item() > 0.1


def test_tied_model_trains_in_pp2_with_one_matrix(models, tmp_path):
    """PP2 keeps two copies of the tied matrix (first and last stage); after a step they are
    still equal and equal the single-process model's one matrix, which got both uses' gradient
    summed: a copy updated with only its own use's gradient would differ from it."""
    ckpt = str(models / "ckpt3.2")
    runs = {}
    for name, nproc, layout in (("pp1", 1, []), ("pp2", 2, ["--pp", "2"])):
        torchrun("tests.engine.llama3x_worker", nproc,
                 ["--checkpoint", ckpt, "--out", str(tmp_path / name), "--mode", "train",
                  "--seq-length", "64", *layout], timeout=300)
        runs[name] = [torch.load(path) for path in sorted((tmp_path / name).glob("weights_*"))]
    key = "embedding.word_embeddings.weight"
    (single,) = runs["pp1"]
    first, last = runs["pp2"]
    # A fresh tied model starts as one matrix too (canonical init names both copies alike).
    fresh = [torch.load(tmp_path / f"pp2/init_rank{rank}.pt")[key] for rank in (0, 1)]
    assert torch.equal(fresh[0], fresh[1])
    assert "output_layer.weight" not in single and "output_layer.weight" not in last
    assert torch.equal(first[key], last[key])  # the tie held
    imported = read_hf_tensors(models / "hf3.2")["model.embed_tokens.weight"]
    assert (single[key][:256] - imported).abs().max().item() > 1e-4  # it trained
    assert torch.allclose(first[key], single[key], rtol=0, atol=1e-6)
    # The PP2 checkpoint exports as a tied model again.
    export_checkpoint(tmp_path / "pp2/ckpt", tmp_path / "hf", dtype="float32", **QUIET)
    exported = read_hf_tensors(tmp_path / "hf")
    assert "lm_head.weight" not in exported
    assert torch.equal(exported["model.embed_tokens.weight"], first[key][:256])
    assert json.loads((tmp_path / "hf/config.json").read_text())["tie_word_embeddings"] is True


def test_published_config_spellings_are_read():
    """Llama-3.1-8B's and Llama-3.2-1B's config.json as published (transformers 4 spelling:
    rope_theta beside rope_scaling)."""
    from engine.convert.hf_mapping import llama_config_from_hf

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    llama31 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rope_scaling": scaling, "tie_word_embeddings": False, "rms_norm_eps": 1e-05}
    config = llama_config_from_hf(llama31, "config.json")
    assert config.rope_base == 500000.0 and config.rope_scaling.to_dict() == {
        "rope_type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}}
    assert config.untie_embeddings and config.kv_channels is None and config.head_dim == 128
    llama32 = {**llama31, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "head_dim": 64, "tie_word_embeddings": True,
               "rope_scaling": {**scaling, "factor": 32.0}}
    config = llama_config_from_hf(llama32, "config.json")
    assert not config.untie_embeddings and config.rope_scaling.factor == 32.0
    assert config.kv_channels is None and config.head_dim == 64  # 2048 / 32: nothing to carry
    plain = llama_config_from_hf(llama32, "config.json", rope_base=8e6)
    assert plain.rope_scaling is None and plain.rope_base == 8e6


def test_untying_on_purpose_gives_the_output_layer_a_copy(models, tmp_path):
    import_checkpoint(models / "hf3.2", tmp_path / "ckpt", untie_embeddings=True, **QUIET)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="float32", **QUIET)
    exported = read_hf_tensors(tmp_path / "out")
    assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out/config.json").read_text())["tie_word_embeddings"] is False


def test_a_scaled_checkpoint_is_not_trained_as_plain_rope_by_omission(models):
    """Training from an import names its RoPE scaling, tie and head_dim in model.overrides;
    leaving the scaling out is refused (plain RoPE is chosen at import, with --rope-base)."""
    from engine.checkpoint import CheckpointError, check_compatible
    from engine.model.config import get_model_config
    from engine.parallel.layout import ParallelLayout
    from engine.training.run_plan import RunPlan

    step = models / "ckpt3.2/step_00000000"
    scaling = json.loads((step / "engine_state.json").read_text())["model_config"]["rope_scaling"]
    shape = dict(num_layers=2, vocab_size=256, ffn_hidden_size=128, kv_channels=32,
                 max_position_embeddings=1024, rope_base=10_000.0)
    with pytest.raises(CheckpointError, match="model.overrides.rope_scaling"):
        check_compatible(step, get_model_config("tiny", untie_embeddings=False, **shape))
    with pytest.raises(CheckpointError, match="untie_embeddings: checkpoint False vs config True"):
        check_compatible(step, get_model_config("tiny", rope_scaling=scaling, **shape))
    model = get_model_config("tiny", rope_scaling=scaling, untie_embeddings=False, **shape)
    assert check_compatible(step, model)["step"] == 0
    described = RunPlan.create(model, ParallelLayout(), seq_length=64, global_batch=1).describe()
    assert "RoPE base 10000 with llama3 scaling (factor 32" in described
    assert "tied embeddings" in described


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, the file, the value and the fix named, nothing written
# ---------------------------------------------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _run(capsys, *argv) -> tuple[int, str]:
    code = convert_main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def hf_copy(models, tmp_path):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(models / "hf3.1", folder)
    return folder


BAD_FOLDERS = {
    "config_list": (lambda f: (f / "config.json").write_text("[1, 2]"),
                    ["config.json", "list", "not a JSON object"]),
    "weight_map_list": (lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": ["model.safetensors"]})),
        ["model.safetensors.index.json", "weight_map", "save_pretrained"]),
    "rope_theta_string": (lambda f: _edit_config(f, rope_parameters=None, rope_theta="fast"),
                          ["config.json", "rope_theta", "'fast'", "e.g. 500000"]),
    "rope_scaling_string": (lambda f: _edit_config(f, rope_scaling="llama3"),
                            ["config.json", "rope_scaling", "'llama3'", "not a mapping"]),
    "hidden_size_string": (lambda f: _edit_config(f, hidden_size="64"),
                           ["config.json", "hidden_size", "'64'", "whole number"]),
    "yarn": (lambda f: _edit_config(f, rope_scaling=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}),
        ["config.json", "'yarn'", "llama3", "--rope-base"]),
    "generation_config_garbage": (lambda f: (f / "generation_config.json").write_text("{oops"),
                                  ["generation_config.json", "not valid JSON", "delete it"]),
    "untied_without_lm_head": (lambda f: _strip_lm_head(f),
                               ["config.json", "tie_word_embeddings is false",
                                "lm_head.weight", "set tie_word_embeddings to true"]),
    "tied_with_another_lm_head": (lambda f: _edit_config(f, tie_word_embeddings=True),
                                  ["config.json", "tie_word_embeddings is true", "differs",
                                   "--untie-embeddings"]),
}


def _strip_lm_head(folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = read_hf_tensors(folder)
    del tensors["lm_head.weight"]
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_hf_folder_is_refused_naming_the_input(hf_copy, tmp_path, capsys, case):
    spoil, expected = BAD_FOLDERS[case]
    spoil(hf_copy)
    code, err = _run(capsys, "import", "--hf", str(hf_copy), "--out", str(tmp_path / "out"))
    assert code == 2, err
    assert all(part in err for part in expected), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp*"))


@pytest.mark.parametrize("args, expected", [
    (["--rope-base", "nan"], ["--rope-base", "nan", "e.g. 8e6"]),
    (["--model-config-overrides", "max_position_embeddings=-5"],
     ["max_position_embeddings", "-5", "positive"]),
])
def test_bad_import_settings_are_refused(models, tmp_path, capsys, args, expected):
    code, err = _run(capsys, "import", "--hf", str(models / "hf3.1"), "--out",
                     str(tmp_path / "out"), *args)
    assert code == 2 and all(part in err for part in expected), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_out_that_cannot_be_written_is_refused_first(models, tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("permission bits do not stop root; a read-only mount is needed")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "out"
    for argv in (["import", "--hf", str(models / "hf3.1")],
                 ["export", "--checkpoint", str(models / "ckpt3.1")]):
        code, err = _run(capsys, *argv, "--out", str(out))
        assert code == 2 and f"--out {out}" in err and "choose" in err, err


def test_garbage_tokenizer_config_is_refused_before_export(models, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer_config.json").write_text("not json")
    code, err = _run(capsys, "export", "--checkpoint", str(models / "ckpt3.1"), "--out",
                     str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"))
    assert code == 2 and "tokenizer_config.json" in err and "re-save the tokenizer" in err, err
    assert not (tmp_path / "out").exists()


def test_verify_explains_a_plain_rope_import_of_a_scaled_folder(models, tmp_path, capsys):
    import_checkpoint(models / "hf3.1", tmp_path / "plain", rope_base=8e6, **QUIET)
    code, err = _run(capsys, "verify", "--checkpoint", str(tmp_path / "plain"), "--hf",
                     str(models / "hf3.1"))
    assert code == 2, err
    assert "plain" in err and "llama3 scaling" in err and "--rope-base" in err, err
    assert "export --checkpoint" in err
