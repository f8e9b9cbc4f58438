"""Check a parallel layout on any machine: train a tiny Llama-3 a few steps and record the result.

Run once in the single-process layout and once in the layout under test, then compare::

    torchrun --nproc-per-node 1 -m engine.parallel.layout_check --out /tmp/ref
    torchrun --nproc-per-node 8 -m engine.parallel.layout_check --tp 2 --pp 2 --sp \\
        --distributed-optimizer --out /tmp/tp2pp2dp2
    torchrun --nproc-per-node 4 -m engine.parallel.layout_check --cp 4 --cp-algorithm ulysses \\
        --seq-length 64 --out /tmp/cp4   # compare with a reference run at --seq-length 64
    python -m engine.parallel.layout_check --compare /tmp/ref /tmp/tp2pp2dp2

``--kernels`` picks the model's kernels (engine.model.kernels), e.g. ``--kernels all=ours`` against
a ``--kernels all=torch`` reference checks our kernels inside training (on CPU: TRITON_INTERPRET=1
and ``--model tiny-hd64``, whose head dim our attention kernel supports).

Each run writes per-step loss and grad norm (``steps.json``) and every rank's weight shards
under canonical names; ``--compare`` reassembles the full weights and reports relative errors.
Weights start canonical (a function of the seed alone) and the synthetic data is the same global
batch whatever the layout, so any difference beyond float reordering is a bug.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

DEFAULT_TOLERANCE = 1e-5


def synthetic_global_batch(vocab_size: int, global_batch: int, seq_length: int, seed: int,
                           masked_prompt_tokens: int = 0):
    """Packed sequences: tokens [G, S], per-sequence document lengths, and token masks.

    Sequence i holds 1 + i % 4 documents (some of length 1) and masks the targets of its last
    i * S / (2G) tokens, so micro-batches carry different numbers of valid tokens: the
    token-averaged loss must weight them by those counts, not equally. With
    ``masked_prompt_tokens`` N, the targets of positions 0..N-1 do not count either (an SFT
    prompt): under context parallelism whole ranks can then hold no valid token.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (global_batch, seq_length), generator=generator).numpy()
    doc_lengths, token_masks = [], []
    for i in range(global_batch):
        cuts = torch.randperm(seq_length - 1, generator=generator)[: i % 4].add(1).sort().values
        bounds = [0, *cuts.tolist(), seq_length]
        doc_lengths.append(np.diff(bounds).astype(np.int32))
        mask = np.ones(seq_length, dtype=np.float32)
        mask[seq_length - i * (seq_length // (2 * global_batch)):] = 0
        # token_mask[t] says whether predicting token t counts; position p predicts p + 1.
        mask[1:masked_prompt_tokens + 1] = 0
        token_masks.append(mask)
    return tokens, doc_lengths, token_masks


def _run(args) -> None:
    from engine.model.config import get_model_config
    from engine.parallel.layout import ParallelLayout

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.for_world_size(
        world_size, tensor_parallel=args.tp, pipeline_parallel=args.pp,
        virtual_stages=args.vpp, sequence_parallel=args.sp,
        distributed_optimizer=args.distributed_optimizer, context_parallel=args.cp,
        context_parallel_algorithm=args.cp_algorithm)
    model = get_model_config(args.model)
    per_rank = args.global_batch // layout.data_parallel
    if args.global_batch % (layout.data_parallel * args.micro_batch):
        raise SystemExit(f"global batch {args.global_batch} is not divisible by DP x micro batch "
                         f"= {layout.data_parallel} x {args.micro_batch}")
    num_microbatches = per_rank // args.micro_batch
    # The sequence split is checked here, before any process group exists.
    layout.validate(model, world_size=world_size, num_microbatches=num_microbatches,
                    seq_length=args.seq_length)
    # megatron is imported only for a layout that can run (its import takes seconds per rank).
    from megatron.core import parallel_state

    from engine.model.build import build_model_chunks, transformer_config, wrap_data_parallel
    from engine.model.sharding import canonical_named_parameters
    from engine.parallel.context.data import slice_micro_batch
    from engine.parallel.setup import destroy_parallel, initialize_parallel
    from engine.training.data import build_micro_batch
    from engine.training.step import OptimizerSettings, build_optimizer, train_step

    initialize_parallel(layout, model, num_microbatches=num_microbatches, seed=args.seed,
                        timeout_s=args.timeout)
    config = transformer_config(model, layout, kernels=args.kernels, recompute=args.recompute)
    chunks = wrap_data_parallel(build_model_chunks(
        model, config, seed=args.seed, cp_algorithm=args.cp_algorithm, kernels=args.kernels), config,
                                layout.distributed_optimizer)
    optimizer, scheduler = build_optimizer(
        chunks, OptimizerSettings(lr=args.lr, warmup_steps=0, decay_steps=args.steps * 2),
        bf16=False, distributed_optimizer=layout.distributed_optimizer)

    tokens, doc_lengths, token_masks = synthetic_global_batch(
        model.vocab_size, args.global_batch, args.seq_length, args.seed,
        masked_prompt_tokens=args.masked_prompt_tokens)
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    micro_batches = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, args.micro_batch):
        rows = range(start, start + args.micro_batch)
        full = build_micro_batch(
            [tokens[r] for r in rows], [doc_lengths[r] for r in rows],
            [token_masks[r] for r in rows], position_mode=args.positions)
        # Each context-parallel rank keeps its load-balanced chunks (and the global positions).
        micro_batches.append(slice_micro_batch(full, cp_rank, layout.context_parallel))
    history = []
    for step in range(args.steps):
        result = train_step(chunks, optimizer, scheduler, micro_batches, num_microbatches,
                            args.seq_length, args.micro_batch)
        history.append({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                        "num_tokens": result.num_tokens, "lr": result.lr})
        if torch.distributed.get_rank() == 0:
            print(f"[{layout.describe()}] step {step} loss {result.loss:.6f} "
                  f"grad_norm {result.grad_norm:.6f} tokens {result.num_tokens}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = {name: param.detach().clone() for chunk in chunks
              for name, param in canonical_named_parameters(chunk.module)}
    rank = torch.distributed.get_rank()
    torch.save({"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "tp_size": layout.tensor_parallel, "dp_rank": dp_rank,
                "cp_rank": cp_rank, "shards": shards},
               out / f"weights_rank{rank}.pt")
    if rank == 0:
        (out / "steps.json").write_text(json.dumps(
            {"layout": layout.describe(), "kernels": args.kernels.describe(),
             "steps": history}, indent=1))
    torch.distributed.barrier()
    destroy_parallel()


def load_full_weights(run_dir: Path) -> dict[str, list[torch.Tensor]]:
    """Full canonical weights of every data/context-parallel replica in a run directory.

    Returns name -> one full tensor per replica, so replicas can be checked against each other.
    """
    from engine.model.sharding import merge_shards

    by_replica: dict[tuple, dict[str, dict[int, torch.Tensor]]] = {}
    for path in sorted(Path(run_dir).glob("weights_rank*.pt")):
        record = torch.load(path, weights_only=True)
        replica = by_replica.setdefault((record["dp_rank"], record["cp_rank"]), {})
        for name, shard in record["shards"].items():
            replica.setdefault(name, {})[record["tp_rank"]] = shard
    if not by_replica:
        raise FileNotFoundError(f"no weights_rank*.pt in {run_dir}: did the run finish?")
    full: dict[str, list[torch.Tensor]] = {}
    for replica in by_replica.values():
        for name, shards in replica.items():
            full.setdefault(name, []).append(merge_shards(name, [shards[r] for r in sorted(shards)]))
    return full


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual, expected = actual.double(), expected.double()
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator else difference


def compare_runs(reference_dir: Path, candidate_dir: Path) -> dict[str, float]:
    """Worst relative error per quantity: loss, grad_norm, weights (max over tensors/replicas)."""
    ref_steps = json.loads((Path(reference_dir) / "steps.json").read_text())["steps"]
    cand_steps = json.loads((Path(candidate_dir) / "steps.json").read_text())["steps"]
    if len(ref_steps) != len(cand_steps):
        raise ValueError(f"{len(ref_steps)} reference steps vs {len(cand_steps)} candidate steps")
    errors = {"loss": 0.0, "grad_norm": 0.0, "weights": 0.0, "num_tokens": 0.0}
    for ref, cand in zip(ref_steps, cand_steps):
        for key in ("loss", "grad_norm", "num_tokens"):
            errors[key] = max(errors[key], abs(cand[key] - ref[key]) / abs(ref[key]))
    ref_weights = load_full_weights(reference_dir)
    cand_weights = load_full_weights(candidate_dir)
    if set(ref_weights) != set(cand_weights):
        missing = sorted(set(ref_weights) ^ set(cand_weights))
        raise ValueError(f"runs hold different parameters: {missing[:5]}")
    worst_name = None
    for name, (expected, *_) in ref_weights.items():
        for replica in cand_weights[name]:
            error = relative_error(replica, expected)
            if error >= errors["weights"]:
                errors["weights"], worst_name = error, name
    errors["worst_weight"] = worst_name
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--compare", nargs=2, metavar=("REFERENCE", "CANDIDATE"),
                        help="compare two finished runs instead of training")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--out", help="directory for steps.json and weight shards")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1, help="virtual stages per pipeline rank")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs TP > 1)")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size (seq-length must divide by 2 x cp)")
    parser.add_argument("--cp-algorithm", choices=("all-gather", "ulysses", "transformer-engine"),
                        default="all-gather", help="how attention crosses the CP group")
    parser.add_argument("--kernels", default="",
                        help="kernel choices, e.g. 'all=ours' or 'attention=torch,rope=ours' "
                             "(engine.model.kernels.KernelChoices.parse; default all auto)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--masked-prompt-tokens", type=int, default=0, metavar="N",
                        help="targets of every sequence's first N positions do not count")
    parser.add_argument("--recompute", choices=("selective", "full"), default=None,
                        help="activation recompute (results must not change)")
    parser.add_argument("--positions", choices=("continuous", "document"), default="continuous",
                        help="RoPE positions across packed documents")
    # 1e-4 moves the smallest-init weights (std 0.02/sqrt(2 x layers)) ~1% a step. Much larger
    # rates make Adam's g / (|g| + eps) amplify fp32 rounding in gradients that cancel to ~1e-8
    # into visible weight differences that are not layout bugs.
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds any collective may wait before failing")
    args = parser.parse_args(argv)
    if args.compare:
        errors = compare_runs(*args.compare)
        print(json.dumps(errors, indent=1))
        worst = max(v for k, v in errors.items() if k != "worst_weight")
        return 0 if worst <= args.tolerance else 1
    if not args.out:
        parser.error("--out is required when training")
    # Checked before any process group exists: a bad choice fails at once on every rank.
    from engine.model.kernels import KernelChoices, default_device

    try:
        # Resolved here, so steps.json records the kernels that ran rather than "auto".
        args.kernels = KernelChoices.parse(args.kernels).resolve(default_device())
    except ValueError as error:
        parser.error(str(error))
    _run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
