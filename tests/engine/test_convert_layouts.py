"""Hugging Face -> engine -> train -> Hugging Face across layouts (fp32, CPU, gloo).

A random transformers Llama is imported once (single process), then trained one step from the
imported weights with a fresh optimizer in TP1 x PP1 and in TP2 x PP2 (4 processes), each run
saving a real checkpoint (optimizer included) that is exported again. The two exports must agree
within 1e-5 relative, the export of the TP2 x PP2 checkpoint must give transformers the engine's
logits, and the imported checkpoint must hold exactly the keys and shapes megatron itself saves.

Run as ``torchrun -m tests.engine.test_convert_layouts --checkpoint IMPORTED --out RUN --tp T
--pp P``, this module is that training run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed
from tests.distributed import run_command, torchrun

TOLERANCE = 1e-5
# lr 1e-4 as the layout checker: Adam's first step moves each weight by ~lr whatever its
# gradient, so at larger rates float reordering in near-zero gradients shows above 1e-5.
GLOBAL_BATCH, SEQ_LENGTH, LR, SEED = 4, 32, 1e-4, 7


def random_hf_llama(folder: Path, vocab_size: int = 512, seed: int = 0,
                    max_shard_size: str = "200KB", dtype=torch.float32) -> dict:
    """save_pretrained a random tiny LlamaForCausalLM (the engine's "tiny" shape); its tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=500_000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones by default: random so a swapped norm would show
                param.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(str(folder), max_shard_size=max_shard_size)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def convert_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m engine.convert ARGS`` as a user runs it."""
    return run_command([sys.executable, "-m", "engine.convert", *args], timeout, distributed.test_env())


# ---------------------------------------------------------------------------------------------
# The training run (torchrun entry point)
# ---------------------------------------------------------------------------------------------

def _train_from_imported(args) -> None:
    """Weights only from the imported checkpoint, fresh optimizer, one step, save."""
    from megatron.core import parallel_state

    from engine.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint_state,
                                   save_checkpoint)
    from engine.checkpoint import model_config_from_state, resolve_checkpoint
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.training.build import build_training_state
    from engine.training.config import OptimizerSection
    from engine.training.data import MicroBatch
    from engine.training.run_plan import RunPlan
    from engine.training.step import train_step

    source = resolve_checkpoint(args.checkpoint)
    model = model_config_from_state(read_checkpoint_state(source), source)
    layout = ParallelLayout.for_world_size(int(os.environ["WORLD_SIZE"]),
                                           tensor_parallel=args.tp, pipeline_parallel=args.pp)
    plan = RunPlan.create(model, layout, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH,
                          kernels=KernelChoices.parse("all=torch"), seed=SEED, train_steps=2,
                          collective_timeout_s=120,
                          optimizer=OptimizerSection(lr=LR, warmup_fraction=0.0))
    per_rank = plan.num_microbatches
    initialize_parallel(layout, seed=SEED, timeout_s=120)
    training = build_training_state(plan)
    chunks, optimizer, scheduler = training.chunks, training.optimizer, training.scheduler
    try:  # asking for optimizer state that an import does not have fails with the fix
        load_checkpoint(source, chunks, optimizer=object(), model_config=model)
        raise AssertionError("loading optimizer state from an imported checkpoint succeeded")
    except CheckpointError as error:
        assert "optimizer=None" in str(error)
    state = load_checkpoint(source, chunks, optimizer=None, model_config=model)
    optimizer.reload_model_params()
    assert state["step"] == 0 and state["weights_only"]

    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, model.vocab_size, (GLOBAL_BATCH, SEQ_LENGTH + 1), generator=generator)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ_LENGTH)
    loss_mask[0, SEQ_LENGTH // 2:] = 0  # unequal valid tokens per micro-batch
    dp_rank = parallel_state.get_data_parallel_rank()
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    tokens, loss_mask = tokens[mine], loss_mask[mine]
    positions = torch.arange(SEQ_LENGTH)[None]
    micro_batches = [MicroBatch(tokens=tokens[i:i + 1, :-1], labels=tokens[i:i + 1, 1:],
                                loss_mask=loss_mask[i:i + 1], position_ids=positions)
                     for i in range(per_rank)]
    result = train_step(chunks, optimizer, scheduler, micro_batches, per_rank, SEQ_LENGTH, 1)
    save_checkpoint(args.out, 1, chunks, optimizer, scheduler, model, layout,
                    {"consumed_samples": GLOBAL_BATCH})
    if torch.distributed.get_rank() == 0:
        (Path(args.out) / "step.json").write_text(json.dumps(
            {"loss": result.loss, "grad_norm": result.grad_norm, "layout": layout.describe()}))
    destroy_parallel()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Imported checkpoint, then one training step in each layout, each exported (fp32)."""
    from engine.convert.export import export_checkpoint
    from engine.convert.importer import import_checkpoint

    root = tmp_path_factory.mktemp("convert_layouts")
    hf_tensors = random_hf_llama(root / "hf")
    import_checkpoint(root / "hf", root / "imported", log=lambda *_: None)
    layouts = {"tp1_pp1": (1, 1, 1), "tp2_pp2": (4, 2, 2)}
    exported = {}
    for name, (nproc, tp, pp) in layouts.items():
        torchrun("tests.engine.test_convert_layouts", nproc,
                 ["--checkpoint", str(root / "imported"), "--out", str(root / name),
                  "--tp", str(tp), "--pp", str(pp)], timeout=240)
        export_checkpoint(root / name, root / f"{name}_hf", dtype="float32",
                          log=lambda *_: None)
        exported[name] = read_hf_tensors(root / f"{name}_hf")
    return {"root": root, "hf": hf_tensors, "exported": exported}


def test_tp2_pp2_step_from_import_matches_single_process(runs):
    from engine.tools.layout_check import relative_error

    single, parallel = runs["exported"]["tp1_pp1"], runs["exported"]["tp2_pp2"]
    assert set(single) == set(parallel) == set(runs["hf"])
    errors = {name: relative_error(parallel[name], single[name]) for name in single}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])
    steps = {name: json.loads((runs["root"] / name / "step.json").read_text())
             for name in ("tp1_pp1", "tp2_pp2")}
    assert abs(steps["tp2_pp2"]["loss"] - steps["tp1_pp1"]["loss"]) <= TOLERANCE * steps[
        "tp1_pp1"]["loss"]
    # The step really trained from the imported weights: every tensor moved, a little.
    for name, before in runs["hf"].items():
        change = relative_error(single[name], before)
        assert 0 < change < 0.2, (name, change)


def test_export_of_tp2_pp2_checkpoint_gives_transformers_the_engine_logits(runs):
    result = convert_cli("verify", "--checkpoint", str(runs["root"] / "tp2_pp2"),
                         "--hf", str(runs["root"] / "tp2_pp2_hf"), timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    worst = float(result.stdout.rsplit("logits max abs diff", 1)[1].split()[0])
    assert worst <= 1e-4
    for case in ("unpacked", "packed_document_positions", "packed_continuous_positions"):
        assert f"{case}: logits max abs diff" in result.stdout


def test_imported_checkpoint_holds_what_megatron_saves(runs):
    """Same model keys, global shapes and dtypes as megatron's own save (TP2 x PP2 here)."""
    import torch.distributed.checkpoint as dcp

    def model_entries(step_dir: Path) -> dict:
        metadata = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
        # From 0.19 megatron's save keeps its common (non-sharded) state inside the torch files
        # as one "common_state" object; the import writes it as common.pt, which 0.19 still
        # reads (the layout 0.16-0.18 save).
        return {key: (tuple(md.size), md.properties.dtype) if hasattr(md, "size") else "bytes"
                for key, md in metadata.items()
                if not key.startswith(("optimizer.", "common_state/"))}

    imported = model_entries(runs["root"] / "imported" / "step_00000000")
    saved = model_entries(runs["root"] / "tp2_pp2" / "step_00000001")
    assert imported == saved
    # The local spec saves its norms under transformer-engine's keys, so a TE model loads this.
    assert {"decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.mlp.linear_fc1.layer_norm_weight"} <= set(saved)
    assert not any("input_layernorm" in key or "pre_mlp_layernorm" in key for key in saved)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=_train_from_imported.__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    _train_from_imported(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
