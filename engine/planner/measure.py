"""Check the planner against memory measured in real (small, CPU, fp32) training steps.

    python -m engine.planner.measure [--seq-lengths 1024 4096] [--out results.json]

For a small Llama-3 (single process) it measures, per sequence length and recompute mode:
- parameters, fp32 main gradients and Adam state, by summing the tensors megatron allocated;
- activations: the bytes of every distinct tensor storage autograd saves for backward inside
  the decoder during one micro-batch's forward (torch.autograd.graph.saved_tensors_hooks), which
  is what the planner's activation term predicts;
- the process's peak resident memory growth (ru_maxrss) over forward + backward, a coarser
  whole-process number,
and prints predicted vs measured with the relative error.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import numpy as np
import torch

from engine.model.config import get_model_config
from engine.model.kernel_choices import KernelChoices
from engine.parallel.layout import ParallelLayout
from engine.parallel.ports import free_port
from engine.parallel.setup import destroy_parallel, initialize_parallel
from engine.planner.memory import Workload, activation_elements, estimate_memory
from engine.training.build import build_training_state
from engine.training.data import build_micro_batch
from engine.training.run_plan import RunPlan

MEASURE_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=768, vocab_size=512)


def _saved_bytes_in(module, run):
    """Bytes of distinct storages autograd saves while ``module`` runs forward inside ``run``."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}
    active = [False]

    def pack(tensor):
        if active[0] and isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def start(*_):
        active[0] = True

    def stop(*_):
        active[0] = False

    handles = [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()), result


def measure(seq_lengths, recompute_modes=("none", "full")) -> list[dict]:
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    model = get_model_config("tiny", max_position_embeddings=max(seq_lengths), **MEASURE_MODEL)
    results = []
    initialize_parallel(ParallelLayout())
    try:
        for recompute in recompute_modes:
            plan = RunPlan.create(model, ParallelLayout(recompute=recompute),
                                  seq_length=max(seq_lengths), global_batch=1,
                                  kernels=KernelChoices.parse("all=torch"), bf16=False)
            state = build_training_state(plan)
            chunks, optimizer = state.chunks, state.optimizer
            gpt = chunks[0].module
            for seq in seq_lengths:
                rng = np.random.default_rng(0)
                tokens = rng.integers(0, model.vocab_size, seq)
                batch = build_micro_batch([tokens], [np.array([seq // 4, seq - seq // 4])]
                                          ).to_accelerator()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

                def forward():
                    return gpt(batch.tokens, batch.position_ids, None, labels=batch.labels,
                               packed_seq_params=batch.packed_seq_params())

                saved, loss = _saved_bytes_in(gpt.decoder, forward)
                loss.sum().backward()
                optimizer.step()
                peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
                params = sum(p.numel() for p in gpt.parameters())
                grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                            for b in chunks[0].buffers)
                state = sum(t.numel() * t.element_size()
                            for group in optimizer.optimizer.state.values()
                            for t in group.values() if torch.is_tensor(t) and t.dim() > 0)
                work = Workload(seq, 1, weight_bytes=4, fused_cross_entropy=False,
                                kernels="unfused")
                predicted = estimate_memory(model, plan.layout, work)
                # What the decoder saves during forward (the planner adds backward transients
                # and the tensors outside the decoder on top).
                predicted_decoder = activation_elements(model, plan.layout, work)[0] * 4
                row = {
                    "recompute": recompute, "seq_length": seq,
                    "parameters": params, "predicted_parameters": predicted.parameters,
                    "gradient_bytes": grads, "predicted_gradient_bytes": predicted.gradients,
                    "optimizer_bytes": state, "predicted_optimizer_bytes": predicted.optimizer,
                    "activation_bytes": saved, "predicted_activation_bytes": predicted_decoder,
                    "peak_rss_growth_bytes": peak_growth,
                }
                for key in ("parameters", "gradient_bytes", "optimizer_bytes",
                            "activation_bytes"):
                    row[f"{key}_error"] = (row[f"predicted_{key}"] - row[key]) / row[key]
                results.append(row)
                del loss
            del chunks, optimizer, state
    finally:
        destroy_parallel()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", help="write the measurements here (JSON)")
    args = parser.parse_args(argv)
    results = measure(sorted(args.seq_lengths))
    print(f"{'recompute':<10}{'seq':>7}{'activations MiB':>17}{'predicted':>11}{'error':>8}"
          f"{'params':>10}{'predicted':>11}{'peak RSS +MiB':>15}")
    for r in results:
        print(f"{r['recompute']:<10}{r['seq_length']:>7}{r['activation_bytes'] / 2**20:>17.1f}"
              f"{r['predicted_activation_bytes'] / 2**20:>11.1f}{r['activation_bytes_error']:>+8.1%}"
              f"{r['parameters']:>10}{r['predicted_parameters']:>11}"
              f"{r['peak_rss_growth_bytes'] / 2**20:>15.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
