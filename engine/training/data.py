"""From packed sequences (data_tools) to the micro-batches the model trains on.

A packed sequence is exactly L tokens with its document lengths. Targets are the next token of
the same sequence; the last position has no target. RoPE positions either run on across the
packed documents (ProLong's choice: attention is masked per document and RoPE is relative) or
restart at each document. Document boundaries become ``cu_seqlens`` over the micro-batch's
flattened tokens, never a dense mask.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from engine.training.step import MicroBatch

POSITION_MODES = ("continuous", "document")


def document_positions(doc_lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at every document: int64 [sum(doc_lengths)]."""
    total = int(doc_lengths.sum())
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    return np.arange(total, dtype=np.int64) - starts


def targets_and_mask(tokens: np.ndarray, doc_lengths: np.ndarray,
                     token_mask: Optional[np.ndarray], mask_cross_document: bool):
    """(labels, loss_mask) for one sequence of L tokens.

    labels[i] = tokens[i + 1]; loss_mask[i] = 0 at the last position, where token i + 1 is a
    padding or SFT-masked token (``token_mask`` marks tokens whose prediction counts), and, with
    ``mask_cross_document``, where token i ends a document: it cannot see the next document under
    the document mask, so predicting that document's first token is noise.
    """
    length = len(tokens)
    labels = np.empty(length, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[-1] = 0
    mask = np.ones(length, dtype=np.float32)
    mask[-1] = 0.0
    if token_mask is not None:
        mask[:-1] *= token_mask[1:]
    if mask_cross_document:
        ends = np.cumsum(doc_lengths)[:-1] - 1
        mask[ends] = 0.0
    return labels, mask


def build_micro_batch(tokens: Sequence[np.ndarray], doc_lengths: Sequence[np.ndarray],
                      token_masks: Sequence[Optional[np.ndarray]] = (),
                      position_mode: str = "continuous",
                      mask_cross_document: bool = True) -> MicroBatch:
    """A micro-batch from ``b`` packed sequences of equal length L (numpy, any int dtype)."""
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode {position_mode!r} must be one of {POSITION_MODES}")
    token_masks = list(token_masks) or [None] * len(tokens)
    length = len(tokens[0])
    rows_tokens, rows_labels, rows_mask, rows_pos, all_lengths = [], [], [], [], []
    for seq_tokens, lengths, token_mask in zip(tokens, doc_lengths, token_masks):
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(seq_tokens) != length or lengths.sum() != length:
            raise ValueError(f"sequence of {len(seq_tokens)} tokens with documents summing to "
                             f"{lengths.sum()} in a micro-batch of length {length}")
        seq_tokens = np.asarray(seq_tokens, dtype=np.int64)
        labels, mask = targets_and_mask(seq_tokens, lengths, token_mask, mask_cross_document)
        rows_tokens.append(seq_tokens)
        rows_labels.append(labels)
        rows_mask.append(mask)
        rows_pos.append(np.arange(length, dtype=np.int64) if position_mode == "continuous"
                        else document_positions(lengths))
        all_lengths.append(lengths)
    flat_lengths = np.concatenate(all_lengths)
    cu_seqlens = np.zeros(len(flat_lengths) + 1, dtype=np.int32)
    np.cumsum(flat_lengths, out=cu_seqlens[1:])
    return MicroBatch(
        tokens=torch.from_numpy(np.stack(rows_tokens)),
        labels=torch.from_numpy(np.stack(rows_labels)),
        loss_mask=torch.from_numpy(np.stack(rows_mask)),
        position_ids=torch.from_numpy(np.stack(rows_pos)),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(flat_lengths.max()),
    )


def attention_cost(doc_lengths: np.ndarray) -> int:
    """Causal document-masked attention work of a sequence, up to a constant: sum of len^2."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    return int((lengths * lengths).sum())


def _greedy_bins(items: Sequence[int], costs: Sequence[int], bins: int,
                 capacity: int) -> list[list[int]]:
    """Longest-processing-time greedy: items in decreasing cost to the least-loaded bin with
    room (ties by index, so the result is deterministic)."""
    assigned: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    for item in sorted(items, key=lambda i: (-costs[i], i)):
        open_bins = [b for b in range(bins) if len(assigned[b]) < capacity]
        target = min(open_bins, key=lambda b: (load[b], b))
        assigned[target].append(item)
        load[target] += costs[item]
    return assigned


def balance_global_batch(costs: Sequence[int], data_parallel: int,
                         num_microbatches: int, micro_batch: int) -> list[list[list[int]]]:
    """Assign a global batch's sequences to (DP rank, micro-batch) slots, balancing cost.

    First across DP ranks (each gets num_microbatches x micro_batch sequences, total cost
    evened), then within a rank across micro-batches, so pipeline stages see even work too.
    Returns ``slots[dp_rank][microbatch] = [sequence indices]``.
    """
    per_rank = num_microbatches * micro_batch
    total = data_parallel * per_rank
    if len(costs) != total:
        raise ValueError(f"{len(costs)} sequences for {data_parallel} DP ranks x "
                         f"{num_microbatches} micro-batches x {micro_batch} = {total} slots")
    ranks = _greedy_bins(range(total), costs, data_parallel, per_rank)
    return [_greedy_bins(rank, costs, num_microbatches, micro_batch) for rank in ranks]
