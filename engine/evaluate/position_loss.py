"""Loss by token position (does more context keep helping?) and mean loss on short documents
(did short-context ability survive?), accumulated from per-token losses the engine computes.

Positions. `losses[i]` of a document is the loss (nats) of predicting token i + 1 from tokens
0..i, so position i has i + 1 tokens of context. Buckets double in width up to the sequence
length L: [0, 64), [64, 128), [128, 256), ..., [2^k, L) with `first_bucket_end` = 64 by
default; the first bucket starts at 0 rather than splitting the first 64 positions into
[0, 1), [1, 2), [2, 4), ... because single positions hold one token per document and give
noisy means, while the question "does more context help" is about thousands of tokens.

    buckets = PositionLossAccumulator(seq_length=65536)
    buckets.add(losses)                        # one document's losses, positions 0..len-1
    buckets.add(losses, positions=positions)   # a context-parallel rank's share, any positions
    buckets.tokens, buckets.loss_sum           # int64 / float64 per bucket: all-reduce these,
    PositionLossAccumulator.from_totals(65536, tokens, loss_sum)   # then rebuild on rank 0
    buckets.buckets() -> [PositionBucket(start, end, tokens, loss)]

    short = MeanLossAccumulator(); short.add(losses, mask); short.result() -> ShortDocumentLoss

Both are token-weighted means (as the training loss is). Only numpy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from engine.evaluate.errors import EvaluationError

FIRST_BUCKET_END = 64


def position_bucket_edges(seq_length: int, first_bucket_end: int = FIRST_BUCKET_END) -> np.ndarray:
    """Edges [0, f, 2f, 4f, ..., L] (int64) of the position buckets; bucket b is
    [edges[b], edges[b + 1])."""
    if seq_length < 1 or first_bucket_end < 1:
        raise EvaluationError(f"seq_length {seq_length}, first_bucket_end {first_bucket_end}: "
                              f"both must be positive token counts")
    edges = [0]
    end = first_bucket_end
    while end < seq_length:
        edges.append(end)
        end *= 2
    edges.append(seq_length)
    return np.asarray(edges, dtype=np.int64)


@dataclass
class PositionBucket:
    """Positions [start, end): `tokens` losses seen there, their mean `loss` (nats; None when
    no token fell in the bucket)."""
    start: int
    end: int
    tokens: int
    loss: Optional[float]


@dataclass
class ShortDocumentLoss:
    """Token-weighted mean loss (nats) over `tokens` predicted tokens of `documents` documents."""
    documents: int
    tokens: int
    loss: Optional[float]


def _as_losses(losses, mask) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    if mask is not None:
        mask = np.asarray(mask).reshape(-1)
        if mask.shape != losses.shape:
            raise EvaluationError(f"mask of {mask.size} entries for {losses.size} losses; give "
                                  f"one mask entry per loss")
    return losses, (None if mask is None else mask.astype(bool))


class PositionLossAccumulator:
    """Sums per-token losses into log2 position buckets up to `seq_length`."""

    def __init__(self, seq_length: int, first_bucket_end: int = FIRST_BUCKET_END):
        self.seq_length = int(seq_length)
        self.edges = position_bucket_edges(self.seq_length, first_bucket_end)
        self.tokens = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.loss_sum = np.zeros(len(self.edges) - 1, dtype=np.float64)

    @classmethod
    def from_totals(cls, seq_length: int, tokens, loss_sum,
                    first_bucket_end: int = FIRST_BUCKET_END) -> "PositionLossAccumulator":
        """Rebuild from (e.g. all-reduced) per-bucket token counts and loss sums."""
        accumulator = cls(seq_length, first_bucket_end)
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        loss_sum = np.asarray(loss_sum, dtype=np.float64).reshape(-1)
        if tokens.shape != accumulator.tokens.shape or loss_sum.shape != accumulator.tokens.shape:
            raise EvaluationError(f"{tokens.size} token counts and {loss_sum.size} loss sums for "
                                  f"{accumulator.tokens.size} buckets of length {seq_length}")
        accumulator.tokens[:] = tokens
        accumulator.loss_sum[:] = loss_sum
        return accumulator

    def add(self, losses, positions=None, mask=None) -> None:
        """Add per-token losses (nats); `positions` (default 0..n-1) index each loss as in the
        module docstring; entries where `mask` is false (e.g. padding) are left out."""
        losses, mask = _as_losses(losses, mask)
        positions = (np.arange(len(losses), dtype=np.int64) if positions is None
                     else np.asarray(positions, dtype=np.int64).reshape(-1))
        if positions.shape != losses.shape:
            raise EvaluationError(f"{positions.size} positions for {losses.size} losses")
        if mask is not None:
            losses, positions = losses[mask], positions[mask]
        if positions.size and (positions.min() < 0 or positions.max() >= self.seq_length):
            raise EvaluationError(f"position {int(positions.max())} outside [0, {self.seq_length}); "
                                  f"give positions below the sequence length")
        bucket = np.searchsorted(self.edges, positions, side="right") - 1
        self.tokens += np.bincount(bucket, minlength=len(self.tokens))
        self.loss_sum += np.bincount(bucket, weights=losses, minlength=len(self.tokens))

    def merge(self, other: "PositionLossAccumulator") -> None:
        if not np.array_equal(self.edges, other.edges):
            raise EvaluationError("merging position buckets of different sequence lengths")
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum

    def buckets(self) -> list[PositionBucket]:
        return [PositionBucket(int(self.edges[b]), int(self.edges[b + 1]), int(self.tokens[b]),
                               float(self.loss_sum[b] / self.tokens[b]) if self.tokens[b] else None)
                for b in range(len(self.tokens))]


class MeanLossAccumulator:
    """Token-weighted mean loss over documents (the short held-out documents)."""

    def __init__(self):
        self.documents = 0
        self.tokens = 0
        self.loss_sum = 0.0

    def add(self, losses, mask=None, documents: int = 1) -> None:
        """Add the per-token losses (nats) of `documents` documents; `mask` leaves tokens out."""
        losses, mask = _as_losses(losses, mask)
        if mask is not None:
            losses = losses[mask]
        self.documents += int(documents)
        self.tokens += int(losses.size)
        self.loss_sum += float(losses.sum())

    def merge(self, other: "MeanLossAccumulator") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum

    def result(self) -> ShortDocumentLoss:
        return ShortDocumentLoss(self.documents, self.tokens,
                                 self.loss_sum / self.tokens if self.tokens else None)
