"""Time whole training steps of a Llama-3-shaped model on one GPU: tokens/s and MFU.

    python bench/kernels/train_step.py                      # Llama-3-8B shapes, 4 layers, 64K tokens,
                                                           # TP1, full recompute, bf16, our kernels
    python bench/kernels/train_step.py --dry                # CPU-sized, through the same code path

The model is built and stepped by the engine itself (engine.training: build_training_state and
train_step, with the optimizer) on synthetic packed documents. MFU counts the model's FLOPs
(6 x matmul parameters x tokens, plus the attention the causal document mask keeps, forward and
backward), not the recompute, against the card's datasheet dense bf16 peak.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from bench import attention_flops, device_peaks  # noqa: E402  (bench/kernels/bench.py, beside this file)


def model_flops(model, lengths_per_sequence: list[list[int]]) -> float:
    """FLOPs of one forward and backward (no recompute) over the given packed sequences."""
    tokens = sum(sum(lengths) for lengths in lengths_per_sequence)
    matmul = model.num_layers * model.linear_parameters_per_layer() + model.vocab_size * model.hidden_size
    attention = sum(attention_flops([int(n) for n in lengths], model.num_attention_heads, model.head_dim)["fwd+bwd"]
                    for lengths in lengths_per_sequence)
    return 6.0 * matmul * tokens + model.num_layers * attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--recompute", default="full")
    parser.add_argument("--kernels", default="all=ours")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--dry", action="store_true",
                        help="CPU-sized run of the same code path (tiny model, fp32, Triton interpreter)")
    args = parser.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.model, args.layers, args.seq_length, args.steps = "tiny-hd64", 2, 64, 1
    elif not torch.cuda.is_available():
        print("no CUDA device: this step times training on a GPU (use --dry to check it on a CPU)")
        return 1

    from engine.model.config import get_model_config
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.ports import free_port
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.tools.layout_check import synthetic_global_batch
    from engine.training.build import build_training_state
    from engine.training.config import OptimizerSection
    from engine.training.data import InMemorySequences, SampleSource, global_batch_indices, rank_micro_batches
    from engine.training.run_plan import RunPlan
    from engine.training.step import train_step

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())

    model = get_model_config(args.model, num_layers=args.layers,
                             max_position_embeddings=max(args.seq_length, 8192))
    layout = ParallelLayout.for_world_size(1, recompute=args.recompute)
    plan = RunPlan.create(model, layout, seq_length=args.seq_length, global_batch=1, micro_batch=1,
                          kernels=KernelChoices.parse(args.kernels), bf16=not args.dry, seed=1234,
                          train_steps=args.steps + 1, optimizer=OptimizerSection(lr=1e-5, warmup_fraction=0.0))
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=600.0)
    try:
        state = build_training_state(plan)
        tokens, doc_lengths, token_masks = synthetic_global_batch(model.vocab_size, 1, args.seq_length, plan.seed)
        samples = SampleSource(InMemorySequences(tokens, doc_lengths, token_masks), plan.seq_length)
        micro_batches, _, _ = rank_micro_batches(
            samples, global_batch_indices(0, 1), data_parallel=1, dp_rank=0, cp_size=1, cp_rank=0,
            num_microbatches=plan.num_microbatches, micro_batch=1, position_mode="document",
            mask_cross_document=True, balance_attention=False)
        flops = model_flops(model, doc_lengths)
        device = torch.device("cuda") if torch.cuda.is_available() and not args.dry else None
        times = []
        for step in range(args.steps + 1):
            if device is not None:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = train_step(state.chunks, state.optimizer, state.scheduler, micro_batches,
                                plan.num_microbatches, plan.seq_length, 1)
            if device is not None:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            print(f"step {step}{' (warm-up)' if step == 0 else ''}: {seconds:.3f} s, loss {result.loss:.4f}, "
                  f"tokens {result.num_tokens}", flush=True)
            if step:
                times.append(seconds)
        seconds = sorted(times)[len(times) // 2]
        peak_tflops, _ = device_peaks()
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device is not None else float("nan")
        print(f"model {args.model} x {args.layers} layers, {args.seq_length} tokens ({len(doc_lengths[0])} documents), "
              f"kernels {plan.kernels.describe()}, recompute {args.recompute}")
        print(f"median step {seconds:.3f} s: {args.seq_length / seconds:,.0f} tokens/s, "
              f"{flops / seconds / 1e12:.1f} TFLOP/s, MFU {100 * flops / seconds / 1e12 / peak_tflops:.1f}% "
              f"of {peak_tflops:.0f} TFLOP/s, peak memory {peak_memory:.1f} GiB"
              + ("   (dry run: timings mean nothing)" if args.dry else ""))
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
