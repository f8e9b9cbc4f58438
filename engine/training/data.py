"""From packed sequences (data_tools) to the micro-batches each rank trains on: the one data path.

A sample is ``seq_length`` tokens: a whole packed sequence, or one of the equal pieces a longer
packed sequence is cut into. Targets are the next token of the same sample; its last position
has no target. RoPE positions either run on across the packed documents (ProLong's choice:
attention is masked per document and RoPE is relative) or restart at each document. Document
boundaries become ``cu_seqlens`` over the micro-batch's flattened tokens, never a dense mask.

Under context parallelism (engine.parallel.context) a rank reads only the token windows of its
two load-balance chunks of every sample (one token more per chunk where the sample goes on: the
label of a chunk's last token is the next chunk's first token) and the document lengths of the
whole sample (a few integers per document, which the attention needs to find each key's
document start). Positions come from the token index within the sample, so they are right for
later documents and for documents spanning ranks, whatever the position mode. Without CP the
same code reads the whole sample as one window.

Sequences come from a ``SequenceSource``: data_tools.packed_dataset.PackedDataset, or InMemorySequences
for sequences built in memory (tools, conversion checks, tests).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from data_tools.packed_dataset import PackedSequence
from engine.device import pinned, to_accelerator
from engine.parallel.context.chunks import chunk_length, load_balanced_chunks

POSITION_MODES = ("continuous", "document")


def check_position_mode(position_mode: str) -> None:
    """ValueError unless ``position_mode`` is one of POSITION_MODES (the one check: the run plan
    calls it on the config, micro_batch_for_rank on what it is given)."""
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode {position_mode!r} must be one of {POSITION_MODES}")


@dataclass
class MicroBatch:
    """One micro-batch on this rank. Shapes [micro_batch, seq] (seq is this rank's share)."""

    tokens: torch.Tensor  # int64 input ids
    labels: torch.Tensor  # int64 next-token targets
    loss_mask: torch.Tensor  # float, 1 where the label counts
    position_ids: torch.Tensor  # int64 RoPE positions
    # Document boundaries over the micro-batch's flattened *full* samples (int32, [docs + 1]);
    # None means one document per sample.
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    # Fault injection for tests: this micro-batch's loss becomes NaN, as after a divergence.
    inject_nan: bool = False

    def to_accelerator(self) -> "MicroBatch":
        """This micro-batch on the accelerator (non-blocking copies from pinned memory on a GPU,
        itself on the host), as the model reads it; cu_seqlens keeps its host values for the
        attention's planning (engine.device.host_copy)."""
        moved = {name: to_accelerator(getattr(self, name))
                 for name in ("tokens", "labels", "loss_mask", "position_ids")}
        if self.cu_seqlens is not None:
            moved["cu_seqlens"] = to_accelerator(self.cu_seqlens, keep_host_copy=True)
        return dataclasses.replace(self, **moved)

    def packed_seq_params(self) -> Optional[PackedSeqParams]:
        if self.cu_seqlens is None:
            return None
        # sbhd: megatron keeps its [seq, batch] layout and standard RoPE path; our core
        # attention reads the boundaries.
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=self.cu_seqlens,
                               cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)


class SequenceSource(Protocol):
    """What the data path reads: PackedDataset's interface."""

    seq_length: int

    def __len__(self) -> int: ...

    def get(self, i: int, start: int = 0, end: Optional[int] = None) -> PackedSequence: ...

    def document_lengths(self, i: int) -> np.ndarray: ...


class InMemorySequences:
    """A SequenceSource over sequences held in memory, all of one length."""

    def __init__(self, tokens: Sequence[np.ndarray], doc_lengths: Sequence[np.ndarray],
                 token_masks: Sequence[Optional[np.ndarray]] = ()):
        self.tokens = [np.asarray(t) for t in tokens]
        self.doc_lengths = [np.asarray(d, dtype=np.int64) for d in doc_lengths]
        self.token_masks = list(token_masks) or [None] * len(self.tokens)
        self.seq_length = len(self.tokens[0]) if self.tokens else 0
        for tokens_i, lengths in zip(self.tokens, self.doc_lengths):
            if len(tokens_i) != self.seq_length or lengths.sum() != self.seq_length:
                raise ValueError(f"sequence of {len(tokens_i)} tokens with documents summing to "
                                 f"{lengths.sum()} among sequences of length {self.seq_length}")

    def __len__(self) -> int:
        return len(self.tokens)

    def document_lengths(self, i: int) -> np.ndarray:
        return self.doc_lengths[i]

    def get(self, i: int, start: int = 0, end: Optional[int] = None) -> PackedSequence:
        end = self.seq_length if end is None else end
        mask = self.token_masks[i]
        return PackedSequence(self.tokens[i][start:end],
                              clip_document_lengths(self.doc_lengths[i], start, end),
                              None if mask is None else mask[start:end])


def clip_document_lengths(doc_lengths: np.ndarray, start: int, end: int) -> np.ndarray:
    """Lengths (int64) of the document pieces inside tokens [start, end) of a sequence."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(doc_lengths, dtype=np.int64))])
    inside = np.clip(bounds, start, end)
    lengths = np.diff(inside)
    return lengths[lengths > 0]


class SampleSource:
    """Samples of ``seq_length`` tokens from a SequenceSource: sample k is piece k mod P of
    sequence k // P, where P = source.seq_length // seq_length pieces fit one sequence."""

    def __init__(self, sequences: SequenceSource, seq_length: int):
        if sequences.seq_length % seq_length:
            raise ValueError(f"seq_length {seq_length} does not divide the sequences' length "
                             f"{sequences.seq_length}")
        self.sequences = sequences
        self.seq_length = seq_length
        self.pieces = sequences.seq_length // seq_length
        self.num_samples = len(sequences) * self.pieces

    def _locate(self, index: int) -> tuple[int, int]:
        sequence, piece = divmod(index % self.num_samples, self.pieces)
        return sequence, piece * self.seq_length

    def document_lengths(self, index: int) -> np.ndarray:
        """Document lengths of sample ``index``, padding included, without reading tokens."""
        sequence, start = self._locate(index)
        lengths = self.sequences.document_lengths(sequence)
        if self.pieces == 1:
            return np.asarray(lengths, dtype=np.int64)
        return clip_document_lengths(lengths, start, start + self.seq_length)

    def pass_started(self, consumed_samples: int, global_batch: int) -> Optional[int]:
        """The 1-based number of the pass over the data that the global batch after
        ``consumed_samples`` samples enters, if it enters one (2 when the data first repeats)."""
        last = (consumed_samples + global_batch - 1) // self.num_samples
        before = (consumed_samples - 1) // self.num_samples if consumed_samples else 0
        return last + 1 if last > before else None

    def window(self, index: int, start: int, end: int) -> PackedSequence:
        """Tokens [start, end) of sample ``index`` (offsets within the sample)."""
        sequence, offset = self._locate(index)
        return self.sequences.get(sequence, offset + start, offset + end)


def document_positions(doc_lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at every document: int64 [sum(doc_lengths)]."""
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    return np.arange(int(doc_lengths.sum()), dtype=np.int64) - starts


def positions_of_tokens(token_indices: np.ndarray, doc_lengths: np.ndarray,
                        position_mode: str) -> np.ndarray:
    """RoPE positions (int64) of the tokens at ``token_indices`` of one sample.

    "continuous": the index; "document": the index minus the start of the token's document.
    """
    token_indices = np.asarray(token_indices, dtype=np.int64)
    if position_mode == "continuous":
        return token_indices.copy()
    return document_positions(doc_lengths)[token_indices]


def targets_and_mask(tokens: np.ndarray, doc_lengths: np.ndarray,
                     token_mask: Optional[np.ndarray], mask_cross_document: bool):
    """(labels, loss_mask) for a window of a sample whose last position has no target.

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


def micro_batch_for_rank(samples: SampleSource, indices: Sequence[int], cp_rank: int = 0,
                         cp_size: int = 1, position_mode: str = "continuous",
                         mask_cross_document: bool = True) -> MicroBatch:
    """This rank's MicroBatch of samples ``indices``: tokens/labels/loss_mask/position_ids
    [b, S / CP] (the rank's two chunks of each sample, or all of it without CP) and cu_seqlens
    over the b x S tokens of the full samples."""
    check_position_mode(position_mode)
    length = samples.seq_length
    windows = ([(0, length)] if cp_size == 1 else
               [(c * chunk_length(length, cp_size), (c + 1) * chunk_length(length, cp_size))
                for c in load_balanced_chunks(cp_rank, cp_size)])
    rows = {"tokens": [], "labels": [], "loss_mask": [], "position_ids": []}
    all_lengths = []
    for index in indices:
        doc_lengths = samples.document_lengths(index)
        all_lengths.append(doc_lengths)
        pieces = {key: [] for key in rows}
        for start, end in windows:
            # One token beyond the window where the sample goes on: the last token's label.
            window = samples.window(index, start, min(end + 1, length))
            token_mask = None if window.loss_mask is None else window.loss_mask.astype(np.float32)
            tokens = np.asarray(window.tokens, dtype=np.int64)
            labels, mask = targets_and_mask(tokens, window.doc_lengths, token_mask,
                                            mask_cross_document)
            width = end - start
            pieces["tokens"].append(tokens[:width])
            pieces["labels"].append(labels[:width])
            pieces["loss_mask"].append(mask[:width])
            pieces["position_ids"].append(positions_of_tokens(
                np.arange(start, end), doc_lengths, position_mode))
        for key in rows:
            rows[key].append(np.concatenate(pieces[key]))
    flat = np.concatenate(all_lengths)
    cu_seqlens = np.zeros(len(flat) + 1, dtype=np.int32)
    np.cumsum(flat, out=cu_seqlens[1:])
    # Pinned on a GPU machine, so the copies to the GPU (MicroBatch.to_accelerator) overlap.
    return MicroBatch(tokens=pinned(torch.from_numpy(np.stack(rows["tokens"]))),
                      labels=pinned(torch.from_numpy(np.stack(rows["labels"]))),
                      loss_mask=pinned(torch.from_numpy(np.stack(rows["loss_mask"]))),
                      position_ids=pinned(torch.from_numpy(np.stack(rows["position_ids"]))),
                      cu_seqlens=pinned(torch.from_numpy(cu_seqlens)), max_seqlen=int(flat.max()))


def build_micro_batch(tokens: Sequence[np.ndarray], doc_lengths: Sequence[np.ndarray],
                      token_masks: Sequence[Optional[np.ndarray]] = (),
                      position_mode: str = "continuous",
                      mask_cross_document: bool = True) -> MicroBatch:
    """A one-rank micro-batch from ``b`` in-memory packed sequences of equal length L."""
    sequences = InMemorySequences(tokens, doc_lengths, token_masks)
    return micro_batch_for_rank(SampleSource(sequences, sequences.seq_length),
                                range(len(sequences)), position_mode=position_mode,
                                mask_cross_document=mask_cross_document)


def global_batch_indices(consumed_samples: int, global_batch: int) -> list[int]:
    """Sample indices of the global batch that starts after ``consumed_samples`` samples (taken
    modulo the number of samples by SampleSource: a further pass repeats the data)."""
    return list(range(consumed_samples, consumed_samples + global_batch))


def rank_micro_batches(samples: SampleSource, indices: Sequence[int], *, data_parallel: int,
                       dp_rank: int, cp_size: int, cp_rank: int, num_microbatches: int,
                       micro_batch: int, position_mode: str, mask_cross_document: bool,
                       balance_attention: bool):
    """(this rank's micro-batches of the global batch ``indices``, every sample's document
    lengths (for FLOP counting), the slots of every DP rank (global_batch_slots)).

    With ``balance_attention`` the samples are assigned to (DP rank, micro-batch) slots by
    attention cost; otherwise DP rank r takes the r-th contiguous share in order.
    """
    doc_lengths = [samples.document_lengths(i) for i in indices]
    slots = global_batch_slots(doc_lengths, data_parallel=data_parallel,
                               num_microbatches=num_microbatches, micro_batch=micro_batch,
                               balance_attention=balance_attention)
    micro_batches = [micro_batch_for_rank(samples, [indices[i] for i in group], cp_rank,
                                          cp_size, position_mode, mask_cross_document)
                     for group in slots[dp_rank]]
    return micro_batches, doc_lengths, slots


def global_batch_slots(doc_lengths: Sequence[np.ndarray], *, data_parallel: int,
                       num_microbatches: int, micro_batch: int,
                       balance_attention: bool) -> list[list[list[int]]]:
    """``slots[dp_rank][microbatch]``: positions within the global batch of the samples each
    (DP rank, micro-batch) trains on, given every sample's document lengths: by attention cost
    with ``balance_attention`` (balance_global_batch), else rank r's share is the r-th
    contiguous one, in order."""
    if balance_attention:
        return balance_global_batch([attention_cost(lengths) for lengths in doc_lengths],
                                    data_parallel, num_microbatches, micro_batch)
    per_rank = num_microbatches * micro_batch
    return [[list(range(r * per_rank + m * micro_batch, r * per_rank + (m + 1) * micro_batch))
             for m in range(num_microbatches)] for r in range(data_parallel)]


def attention_imbalance(doc_lengths: Sequence[np.ndarray], slots) -> float:
    """The most loaded DP rank's attention cost over the mean rank's (1.0: even), for the
    ``slots`` of global_batch_slots; the DP ranks wait for the slowest at every step."""
    costs = [sum(attention_cost(doc_lengths[i]) for group in rank for i in group)
             for rank in slots]
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean else 1.0


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
