"""Causal load balance: which tokens of a sequence each context-parallel rank holds.

A sequence of S tokens is cut into 2 x CP chunks of S / (2 x CP) tokens; rank r keeps chunks r
and 2 x CP - 1 - r. Under a causal mask, the work of a chunk grows with its index, so pairing an
early chunk with a late one gives every rank the same work (megatron / transformer-engine use the
same split, so checkpoints and data pipelines agree on which rank holds which tokens).

A rank's tokens are laid out as [chunk r, chunk 2CP-1-r] along the sequence dimension.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from engine.parallel.layout import check_sequence_split


def load_balanced_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices (of 2 x cp_size) that rank ``cp_rank`` holds, in its local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside a context-parallel group of {cp_size}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def chunk_length(seq_length: int, cp_size: int) -> int:
    """Tokens per chunk; raises LayoutError if ``seq_length`` does not split into 2 x CP chunks."""
    return check_sequence_split(seq_length, cp_size)


def rank_token_indices(seq_length: int, cp_rank: int, cp_size: int) -> np.ndarray:
    """Global token indices (int64 [S / CP]) of rank ``cp_rank``'s tokens, in its local order."""
    length = chunk_length(seq_length, cp_size)
    return np.concatenate([np.arange(c * length, (c + 1) * length, dtype=np.int64)
                           for c in load_balanced_chunks(cp_rank, cp_size)])


def gathered_to_sequence_order(seq_length: int, cp_size: int) -> torch.Tensor:
    """Permutation p (int64 [S]) with sequence[t] = gathered[p[t]].

    ``gathered`` is the concatenation of every rank's local tokens in rank order (what an
    all-gather or a Ulysses all-to-all along the sequence returns).
    """
    gathered = np.concatenate([rank_token_indices(seq_length, r, cp_size)
                               for r in range(cp_size)])
    order = np.empty(seq_length, dtype=np.int64)
    order[gathered] = np.arange(seq_length, dtype=np.int64)
    return torch.from_numpy(order)


def sequence_to_gathered_order(seq_length: int, cp_size: int) -> torch.Tensor:
    """Inverse of gathered_to_sequence_order: gathered[i] = sequence[p[i]]."""
    return torch.from_numpy(np.concatenate([rank_token_indices(seq_length, r, cp_size)
                                            for r in range(cp_size)]))


@functools.lru_cache(maxsize=32)
def device_permutation(kind: str, seq_length: int, cp_size: int,
                       device: torch.device) -> torch.Tensor:
    """gathered_to_sequence_order ("gathered_to_sequence") or sequence_to_gathered_order
    ("sequence_to_gathered") on ``device``, built and copied once per (length, CP, device):
    every layer of every micro-batch, forward and recompute, uses the same few."""
    build = {"gathered_to_sequence": gathered_to_sequence_order,
             "sequence_to_gathered": sequence_to_gathered_order}[kind]
    return build(seq_length, cp_size).to(device)
