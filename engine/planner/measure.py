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
import socket
import sys

MEASURE_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=768, vocab_size=512)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _saved_bytes_in(module, run):
    """Bytes of distinct storages autograd saves while ``module`` runs forward inside ``run``."""
    import torch

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
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import numpy as np
    import torch
    from megatron.core.utils import get_model_config as megatron_config

    from engine.model.build import build_model_chunks, transformer_config, wrap_data_parallel
    from engine.model.config import get_model_config
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.planner.memory import Layout, Workload, activation_elements, estimate_memory
    from engine.training.data import build_micro_batch
    from engine.training.step import OptimizerSettings, build_optimizer

    model = get_model_config("tiny", max_position_embeddings=max(seq_lengths),
                             **MEASURE_MODEL)
    layout = ParallelLayout()
    initialize_parallel(layout, model)
    results = []
    try:
        for recompute in recompute_modes:
            config = transformer_config(model, layout,
                                        recompute=None if recompute == "none" else recompute)
            chunks = wrap_data_parallel(build_model_chunks(model, config), config, False)
            optimizer, _ = build_optimizer(chunks, OptimizerSettings(), bf16=False,
                                           distributed_optimizer=False)
            gpt = chunks[0].module
            for seq in seq_lengths:
                rng = np.random.default_rng(0)
                tokens = rng.integers(0, model.vocab_size, seq)
                batch = build_micro_batch([tokens], [np.array([seq // 4, seq - seq // 4])])
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
                planned_layout = Layout(1, 1, 1, 1, recompute, sequence_parallel=False)
                work = Workload(seq, 1, weight_bytes=4, fused_cross_entropy=False,
                                distributed_optimizer=False, kernels="unfused")
                predicted = estimate_memory(model, planned_layout, work)
                # What the decoder saves during forward (the planner adds backward transients
                # and the tensors outside the decoder on top).
                predicted_decoder = activation_elements(model, planned_layout, work)[0] * 4
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
            del chunks, optimizer
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
