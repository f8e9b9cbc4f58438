"""This rank's share of packed micro-batches under context parallelism; never a dense mask.

Every CP rank holds the tokens, labels, loss mask and RoPE positions of its own two chunks
(engine.parallel.context.chunks) and the document boundaries of the full sequences (a few
integers per document; the attention needs them to know where each key's document starts).
Positions come from the global token index and the document starts, so they are right for later
documents of a packed sequence and for documents spanning ranks, whatever the position mode.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.parallel.context.chunks import chunk_length, load_balanced_chunks, rank_token_indices
from engine.training.data import POSITION_MODES, targets_and_mask
from engine.training.step import MicroBatch


def positions_of_tokens(token_indices: np.ndarray, doc_lengths: np.ndarray,
                        position_mode: str) -> np.ndarray:
    """RoPE positions (int64) of the tokens at global ``token_indices`` of one sequence.

    "continuous": the global index; "document": index minus the start of the token's document.
    """
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode {position_mode!r} must be one of {POSITION_MODES}")
    token_indices = np.asarray(token_indices, dtype=np.int64)
    if position_mode == "continuous":
        return token_indices.copy()
    starts = np.concatenate([[0], np.cumsum(np.asarray(doc_lengths, dtype=np.int64))[:-1]])
    document = np.searchsorted(starts, token_indices, side="right") - 1
    return token_indices - starts[document]


def slice_micro_batch(batch: MicroBatch, cp_rank: int, cp_size: int) -> MicroBatch:
    """This rank's tokens of a micro-batch built over full sequences (engine.training.data).

    Labels and the loss mask were computed on the full sequence, so the label of a chunk's last
    token is already the next chunk's first token; cu_seqlens stays that of the full sequences.
    """
    if cp_size == 1:
        return batch
    seq_length = batch.tokens.shape[1]
    index = torch.from_numpy(rank_token_indices(seq_length, cp_rank, cp_size))

    def take(t):
        return t.index_select(1, index.to(t.device)).contiguous()

    return MicroBatch(tokens=take(batch.tokens), labels=take(batch.labels),
                      loss_mask=take(batch.loss_mask), position_ids=take(batch.position_ids),
                      cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)


def context_parallel_micro_batch(dataset, indices: Sequence[int], cp_rank: int, cp_size: int,
                                 position_mode: str = "continuous",
                                 mask_cross_document: bool = True) -> MicroBatch:
    """This rank's MicroBatch of packed sequences ``indices`` of ``dataset`` (a PackedDataset).

    Reads only the token windows of this rank's chunks (one token more per chunk where the
    sequence goes on: the label of a chunk's last token is the next chunk's first token), so a
    rank materializes 2 x S / (2 x CP) tokens of a 512K sequence, and no mask beyond its tokens.
    Returns tokens/labels/loss_mask/position_ids [b, S / CP] and cu_seqlens over the b x S
    tokens of the full sequences (as slice_micro_batch of build_micro_batch would).
    """
    seq_length = dataset.seq_length
    length = chunk_length(seq_length, cp_size)
    rows = {"tokens": [], "labels": [], "loss_mask": [], "position_ids": []}
    all_lengths = []
    for i in indices:
        doc_lengths = dataset.document_lengths(i)
        all_lengths.append(doc_lengths)
        pieces = {key: [] for key in rows}
        for chunk in load_balanced_chunks(cp_rank, cp_size):
            start, end = chunk * length, (chunk + 1) * length
            window = dataset.get(i, start, min(end + 1, seq_length))
            token_mask = None if window.loss_mask is None else window.loss_mask.astype(np.float32)
            labels, mask = targets_and_mask(np.asarray(window.tokens, dtype=np.int64),
                                            window.doc_lengths, token_mask, mask_cross_document)
            pieces["tokens"].append(np.asarray(window.tokens[:length], dtype=np.int64))
            pieces["labels"].append(labels[:length])
            pieces["loss_mask"].append(mask[:length])
            pieces["position_ids"].append(positions_of_tokens(
                np.arange(start, end), doc_lengths, position_mode))
        for key in rows:
            rows[key].append(np.concatenate(pieces[key]))
    flat = np.concatenate(all_lengths)
    cu_seqlens = np.zeros(len(flat) + 1, dtype=np.int32)
    np.cumsum(flat, out=cu_seqlens[1:])
    return MicroBatch(tokens=torch.from_numpy(np.stack(rows["tokens"])),
                      labels=torch.from_numpy(np.stack(rows["labels"])),
                      loss_mask=torch.from_numpy(np.stack(rows["loss_mask"])),
                      position_ids=torch.from_numpy(np.stack(rows["position_ids"])),
                      cu_seqlens=torch.from_numpy(cu_seqlens), max_seqlen=int(flat.max()))
