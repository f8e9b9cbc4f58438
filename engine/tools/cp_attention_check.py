"""Check context-parallel attention against single-process attention on this machine.

    torchrun --nproc-per-node 4 -m engine.tools.cp_attention_check [--out results.json]

Every rank builds the same packed sequences (documents longer than a chunk, spanning chunk and
rank borders, of one token) and the same Q/K/V; the reference is document-masked attention over
the full sequences in one process. Each algorithm then runs on every CP group size that divides
the world (CP = world and CP = 2 in groups of two), on its load-balanced share, and the outputs
and the gradients of Q, K and V on each rank must match the reference's rows within --tolerance
(fp64). A deliberately wrong token-to-rank mapping (contiguous shards fed to the load-balanced
algorithms) is run too and must *fail* the comparison, so the check can tell.
Exit status 0 when every case passes; results (max relative errors) go to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from csrc.attention import varlen_attention
from engine.parallel.context.all_gather import all_gather_kv_attention
from engine.parallel.context.chunks import rank_token_indices
from engine.parallel.context.ulysses import ulysses_attention

ALGORITHMS = {"all-gather": all_gather_kv_attention, "ulysses": ulysses_attention}


def packed_documents(batch: int, seq_length: int, chunk: int) -> list[np.ndarray]:
    """Per-sequence document lengths that exercise every border case of the 2 x CP split."""
    patterns = [
        [seq_length],                                   # one document over every chunk
        [1, chunk + 3, 2 * chunk - 1, seq_length - 3 * chunk - 4, 1],  # spans, tiny docs
        [chunk, chunk, seq_length - 2 * chunk],         # boundaries exactly on chunk borders
    ]
    return [np.asarray(patterns[i % len(patterns)], dtype=np.int64) for i in range(batch)]


def _attend_full(q, k, v, cu_seqlens, max_seqlen):
    """Reference on [S, b, h, d] tensors: returns [S, b, h * d]."""
    seq, batch = q.shape[:2]
    tokens = [x.transpose(0, 1).reshape(seq * batch, x.shape[2], x.shape[3]) for x in (q, k, v)]
    out, _ = varlen_attention(*tokens, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                              impl="torch")
    return out.reshape(batch, seq, -1).transpose(0, 1)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_case(algorithm: str, group, heads: int, kv_heads: int, batch: int, seq_length: int,
               wrong_mapping: bool = False, seed: int = 0) -> dict:
    """Max relative errors of output and dQ/dK/dV over this rank's tokens (fp64)."""
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    dim = 8
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_length, batch, heads, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(seq_length, batch, kv_heads, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(seq_length, batch, kv_heads, dim, generator=generator, dtype=torch.float64)
    grad = torch.randn(seq_length, batch, heads * dim, generator=generator, dtype=torch.float64)
    lengths = np.concatenate(packed_documents(batch, seq_length, seq_length // (2 * cp_size)))
    cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    max_seqlen = int(lengths.max())

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = _attend_full(*full, cu_seqlens, max_seqlen)
    reference.backward(grad)

    if wrong_mapping:  # the classic bug: contiguous shards where load-balanced ones are expected
        share = seq_length // cp_size
        index = torch.arange(cp_rank * share, (cp_rank + 1) * share)
    else:
        index = torch.from_numpy(rank_token_indices(seq_length, cp_rank, cp_size))
    local = [t.index_select(0, index).clone().requires_grad_() for t in (q, k, v)]
    if algorithm == "all-gather":
        out = all_gather_kv_attention(*local, cu_seqlens, group)
    else:
        out = ulysses_attention(*local, cu_seqlens, max_seqlen, group)
    out.backward(grad.index_select(0, index))
    errors = {"out": _relative(out, reference.detach().index_select(0, index))}
    for name, mine, ref in zip(("dq", "dk", "dv"), local, full):
        errors[name] = _relative(mine.grad, ref.grad.index_select(0, index))
    errors["finite"] = bool(torch.isfinite(out).all() and all(torch.isfinite(t.grad).all()
                                                               for t in local))
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the per-case errors here (JSON)")
    parser.add_argument("--tolerance", type=float, default=1e-10)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = {world: dist.group.WORLD}
    if world > 2 and world % 2 == 0:
        # Every rank creates every group (a collective), then keeps its own pair.
        pairs = [dist.new_group([r, r + 1], timeout=timedelta(seconds=args.timeout))
                 for r in range(0, world, 2)]
        groups[2] = pairs[rank // 2]
    # (heads, kv_heads): GQA, and fewer KV heads than CP (Ulysses repeats them).
    shapes = [(4, 2), (8, 1), (4, 4)]
    results, ok = [], True
    for cp_size, group in sorted(groups.items()):
        for algorithm in ALGORITHMS:
            for heads, kv_heads in shapes:
                if algorithm == "ulysses" and heads % cp_size:
                    continue
                for wrong in (False, True):
                    errors = check_case(algorithm, group, heads, kv_heads, batch=3,
                                        seq_length=args.seq_length, wrong_mapping=wrong)
                    worst = max(v for key, v in errors.items() if key != "finite")
                    passed = errors["finite"] and (worst > 1e-3 if wrong else
                                                   worst <= args.tolerance)
                    ok &= passed
                    results.append({"rank": rank, "cp": cp_size, "algorithm": algorithm,
                                    "heads": heads, "kv_heads": kv_heads,
                                    "wrong_mapping": wrong, "passed": passed, **errors})
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        flat = [r for per_rank in gathered for r in per_rank]
        for r in flat:
            if not r["passed"] or r["rank"] == 0:
                print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(flat, f, indent=1)
    all_ok = torch.tensor([int(ok)])
    dist.all_reduce(all_ok, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    return 0 if all_ok.item() else 1


if __name__ == "__main__":
    sys.exit(main())
