"""Check a parallel layout on any machine: train a tiny Llama-3 a few steps and record the result.

Run once in the single-process layout and once in the layout under test, then compare::

    torchrun --nproc-per-node 1 -m engine.tools.layout_check --out /tmp/ref
    torchrun --nproc-per-node 8 -m engine.tools.layout_check --tp 2 --pp 2 --sp \\
        --distributed-optimizer --out /tmp/tp2pp2dp2
    torchrun --nproc-per-node 4 -m engine.tools.layout_check --cp 4 --cp-algorithm ulysses \\
        --seq-length 64 --out /tmp/cp4   # compare with a reference run at --seq-length 64
    python -m engine.tools.layout_check --compare /tmp/ref /tmp/tp2pp2dp2

``--kernels`` picks the model's kernels (engine.model.kernel_choices), e.g. ``--kernels all=ours`` against
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
from megatron.core import parallel_state

from engine.model.config import get_model_config
from engine.model.kernel_choices import KernelChoices
from engine.model.sharding import canonical_named_parameters, merge_shards
from engine.parallel.layout import CP_ALGORITHMS, RECOMPUTE_MODES, LayoutError, ParallelLayout
from engine.parallel.param_sync import parameters_current
from engine.parallel.setup import destroy_parallel, initialize_parallel
from engine.training.build import build_training_state
from engine.training.config import ConfigError, OptimizerSection
from engine.training.data import (
    InMemorySequences,
    SampleSource,
    global_batch_indices,
    rank_micro_batches,
)
from engine.training.run_plan import RunPlan
from engine.training.step import train_step

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


def _plan(args, world_size: int) -> RunPlan:
    """The run plan of the command line; every check that needs no process group, here."""
    layout = ParallelLayout.for_world_size(
        world_size, tensor_parallel=args.tp, pipeline_parallel=args.pp,
        virtual_stages=args.vpp, sequence_parallel=args.sp,
        distributed_optimizer=args.distributed_optimizer, context_parallel=args.cp,
        cp_algorithm=args.cp_algorithm, recompute=args.recompute)
    return RunPlan.create(
        get_model_config(args.model), layout, seq_length=args.seq_length,
        global_batch=args.global_batch, micro_batch=args.micro_batch,
        kernels=KernelChoices.parse(args.kernels), bf16=args.bf16, seed=args.seed,
        # No warm-up, and the cosine decay spread over twice the steps run (--steps 0 records
        # the initial weights).
        train_steps=max(args.steps, 1) * 2, collective_timeout_s=args.timeout,
        optimizer=OptimizerSection(lr=args.lr, warmup_fraction=0.0))


def _run(args, plan: RunPlan) -> None:
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    state = build_training_state(plan, overlap=args.overlap or None)
    tokens, doc_lengths, token_masks = synthetic_global_batch(
        plan.model.vocab_size, plan.global_batch, plan.seq_length, plan.seed,
        masked_prompt_tokens=args.masked_prompt_tokens)
    samples = SampleSource(InMemorySequences(tokens, doc_lengths, token_masks), plan.seq_length)
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    # The training data path: the same global batch whatever the layout, each rank reading its
    # own share (DP slice, CP chunks).
    micro_batches, _, _ = rank_micro_batches(
        samples, global_batch_indices(0, plan.global_batch),
        data_parallel=plan.layout.data_parallel, dp_rank=dp_rank,
        cp_size=plan.layout.context_parallel, cp_rank=cp_rank,
        num_microbatches=plan.num_microbatches, micro_batch=plan.micro_batch,
        position_mode=args.positions, mask_cross_document=True, balance_attention=False)
    history = []
    for step in range(args.steps):
        result = train_step(state.chunks, state.optimizer, state.scheduler, micro_batches,
                            plan.num_microbatches, plan.seq_length, plan.micro_batch)
        history.append({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                        "num_tokens": result.num_tokens, "lr": result.lr})
        if torch.distributed.get_rank() == 0:
            print(f"[{plan.layout.describe()}] step {step} loss {result.loss:.6f} "
                  f"grad_norm {result.grad_norm:.6f} tokens {result.num_tokens}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with parameters_current(state.chunks):
        shards = {name: param.detach().float().clone().cpu() for chunk in state.chunks
                  for name, param in canonical_named_parameters(chunk.module)}
    rank = torch.distributed.get_rank()
    torch.save({"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "tp_size": plan.layout.tensor_parallel, "dp_rank": dp_rank,
                "cp_rank": cp_rank, "shards": shards},
               out / f"weights_rank{rank}.pt")
    if rank == 0:
        (out / "steps.json").write_text(json.dumps(
            {"layout": plan.layout.describe(), "kernels": plan.kernels.describe(),
             "bf16": plan.bf16, "steps": history}, indent=1))
    torch.distributed.barrier()
    destroy_parallel()


def load_full_weights(run_dir: Path) -> dict[str, list[torch.Tensor]]:
    """Full canonical weights of every data/context-parallel replica in a run directory.

    Returns name -> one full tensor per replica, so replicas can be checked against each other.
    """
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
    parser.add_argument("--overlap", action="store_true",
                        help="the GPU path's communication overlap on the host: each gradient "
                             "bucket reduced during backward and, with --distributed-optimizer, "
                             "the parameters all-gathered during the next forward")
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size (seq-length must divide by 2 x cp)")
    parser.add_argument("--cp-algorithm", choices=CP_ALGORITHMS,
                        default="all-gather", help="how attention crosses the CP group")
    parser.add_argument("--kernels", default="",
                        help="kernel choices, e.g. 'all=ours' or 'attention=torch,rope=ours' "
                             "(engine.model.kernel_choices.KernelChoices.parse; default all auto)")
    parser.add_argument("--steps", type=int, default=2,
                        help="optimizer steps (0: record the initial weights)")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--masked-prompt-tokens", type=int, default=0, metavar="N",
                        help="targets of every sequence's first N positions do not count")
    parser.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none",
                        help="activation recompute (results must not change)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights and activations (default fp32: layouts compare to 1e-5)")
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
    # Checked before any process group exists: a bad layout or kernel fails at once on every
    # rank. The plan resolves the kernels, so steps.json records what ran rather than "auto".
    try:
        plan = _plan(args, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, LayoutError, ValueError) as error:
        parser.error(str(error))
    _run(args, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
