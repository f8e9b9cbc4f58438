"""Evaluation forward: the engine (engine.evaluate.engine_scores) against transformers on the same
checkpoint, the same lengths and the same machine, in one run.

    python bench/evaluate/bench_eval_forward.py                      # random model, CPU or GPU
    python bench/evaluate/bench_eval_forward.py --lengths 1024 4096 16384 --hidden 512
    python bench/evaluate/bench_eval_forward.py --smoke              # tiny, for the tests

Two workloads per length L, each measured in a fresh process (its peak memory is the process's):
- "all tokens" (loss by position): per-token loss of one L-token document. transformers computes
  the [L, vocab] logits; the engine computes scores chunk by chunk from the output layer.
- "answer only" (teacher-forced recall): the argmax at the last 16 positions. transformers with
  `logits_to_keep` (its cheapest path); the engine scores only the masked positions.
Prints tokens/s and peak memory (GPU: torch.cuda.max_memory_allocated, weights included; CPU:
peak RSS growth over the forward passes, above the loaded model) for each, and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.parallel.ports import free_port  # noqa: E402  (stdlib only: torch stays in the children)
ANSWER_TOKENS = 16


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _baseline_bytes() -> int:
    """What the peak is measured above: on GPU the weights stay allocated (the peak includes
    them, 0 here); on CPU the process's peak RSS with the model loaded, before any forward."""
    import torch

    if torch.cuda.is_available():
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_engine(checkpoint: str, length: int, workload: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from engine.checkpoint import load_checkpoint, read_checkpoint_state
    from engine.checkpoint import model_config_from_state, resolve_checkpoint
    from engine.evaluate.engine_scores import score_samples
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import initialize_parallel
    from engine.training.build import build_inference_model
    from engine.training.data import InMemorySequences, SampleSource
    from engine.training.run_plan import RunPlan

    path = resolve_checkpoint(checkpoint)
    model = model_config_from_state(read_checkpoint_state(path), path)
    model = model.replace(max_position_embeddings=max(length, model.max_position_embeddings))
    plan = RunPlan.create(model, ParallelLayout(), seq_length=length, global_batch=1,
                          kernels=KernelChoices(), bf16=torch.cuda.is_available())
    initialize_parallel(plan.layout, seed=plan.seed)
    chunks = build_inference_model(plan)
    load_checkpoint(path, chunks, model_config=model)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, length)
    mask = None
    if workload == "answer":
        mask = np.zeros(length, np.float32)
        mask[length - ANSWER_TOKENS:] = 1
    samples = SampleSource(InMemorySequences([tokens], [[length]], [mask] if mask is not None
                                             else ()), length)
    before = _baseline_bytes()
    score_samples(chunks, plan, samples, [0])  # warm-up (kernels, allocator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        scores = score_samples(chunks, plan, samples, [0])[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    scored = np.flatnonzero(~np.isnan(scores.loss))
    return {"seconds": seconds, "peak_bytes": _peak_bytes() - before,
            "losses": scores.loss[scored].astype(float).tolist(),
            "argmax": scores.argmax[scored].astype(int).tolist()}


def _measure_hf(folder: str, length: int, workload: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from engine.evaluate.hf_model import load_hf_model, teacher_forced_reference, token_losses
    from engine.evaluate.tasks import RecallExample

    model = load_hf_model(folder, dtype="bfloat16" if torch.cuda.is_available() else "float32")
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, length)
    if workload == "answer":
        example = RecallExample(
            task="bench", length=length - ANSWER_TOKENS, depth=0.0, index=0, seed=0,
            prompt_ids=tokens[:length - ANSWER_TOKENS].astype(np.int32),
            answer_ids=tokens[length - ANSWER_TOKENS:].astype(np.int32), gold=("x",),
            answer_value_ends=(ANSWER_TOKENS,), needle_spans=((0, 1),), context_span=(0, 1))

        def run():
            output = teacher_forced_reference(model, example)
            return output.token_losses, output.predicted_ids
    else:
        def run():
            return token_losses(model, tokens), None
    before = _baseline_bytes()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        losses, argmax = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    return {"seconds": seconds, "peak_bytes": _peak_bytes() - before,
            "losses": np.asarray(losses, dtype=float).tolist(),
            "argmax": None if argmax is None else np.asarray(argmax).astype(int).tolist()}


def _one(args) -> None:
    """Child process: one (implementation, length, workload) measurement, as JSON on stdout."""
    measure = _measure_engine if args.impl == "engine" else _measure_hf
    source = args.checkpoint if args.impl == "engine" else args.hf
    print(json.dumps(measure(source, args.length, args.workload, args.repeats)), flush=True)


def _run_child(impl: str, source: dict, length: int, workload: str, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="1", RANK="0")
    result = subprocess.run(
        [sys.executable, __file__, "--child", impl, "--length", str(length), "--workload",
         workload, "--repeats", str(repeats), "--checkpoint", source["checkpoint"],
         "--hf", source["hf"]], capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{impl} at {length} ({workload}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _agreement(name: str, length: int, ours: dict, theirs: dict) -> dict:
    """How closely the engine's per-token losses (and argmax, where transformers gave one)
    match transformers' on the same tokens."""
    import numpy as np

    engine_losses, hf_losses = np.asarray(ours["losses"]), np.asarray(theirs["losses"])
    row = {"workload": name, "tokens": length, "engine_scored": len(engine_losses),
           "transformers_scored": len(hf_losses)}
    if len(engine_losses) == len(hf_losses):
        row["max_loss_difference"] = float(np.abs(engine_losses - hf_losses).max())
        if theirs["argmax"] is not None:
            row["argmax_equal"] = ours["argmax"] == theirs["argmax"]
    return row


def _random_checkpoint(root: Path, hidden: int, layers: int) -> dict:
    """A random LlamaForCausalLM with Llama-3's vocabulary, saved, and imported into the engine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                         num_key_value_heads=max(hidden // 256, 1),
                         max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(root / "hf"))
    subprocess.run([sys.executable, "-m", "engine.convert", "import", "--hf", str(root / "hf"),
                    "--out", str(root / "ckpt")], check=True, cwd=REPO, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    return {"hf": str(root / "hf"), "checkpoint": str(root / "ckpt")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", default="", help="engine checkpoint (with --hf: its export)")
    parser.add_argument("--hf", default="", help="Hugging Face folder of the same weights")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--child", choices=("engine", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=("all", "answer"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.impl = args.child
        _one(args)
        return 0
    if args.smoke:
        args.lengths, args.hidden, args.layers, args.repeats = [256], 64, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        source = ({"checkpoint": args.checkpoint, "hf": args.hf} if args.checkpoint and args.hf
                  else _random_checkpoint(Path(tmp), args.hidden, args.layers))
        print("| workload | tokens | engine tok/s | transformers tok/s | speed ratio | engine peak MiB "
              "| transformers peak MiB | memory ratio |")
        print("|---|---|---|---|---|---|---|---|")
        agreement = []
        for workload in ("all", "answer"):
            for length in args.lengths:
                ours = _run_child("engine", source, length, workload, args.repeats)
                theirs = _run_child("hf", source, length, workload, args.repeats)
                name = "all tokens" if workload == "all" else "answer only"
                print(f"| {name} | {length} | {length / ours['seconds']:,.0f} | "
                      f"{length / theirs['seconds']:,.0f} | "
                      f"{theirs['seconds'] / ours['seconds']:.2f}x | "
                      f"{ours['peak_bytes'] / 2**20:,.0f} | {theirs['peak_bytes'] / 2**20:,.0f} | "
                      f"{ours['peak_bytes'] / max(theirs['peak_bytes'], 1):.2f} |", flush=True)
                agreement.append(_agreement(name, length, ours, theirs))
        # Both sides scored the same tokens with the same weights: a speed-up that changed the
        # numbers would show here.
        for row in agreement:
            print("agreement " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
