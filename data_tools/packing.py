"""Packing documents into sequences of exactly L tokens, as index arrays (no token is copied).

A source's documents are laid end to end in a chosen order: the "stream". A packed sequence is
a window [start, end) of that stream plus L - (end - start) padding tokens, stored as one row
(start, end, first_document_position) of an int64 array. Memory is O(documents + sequences).

Three rules, from the ProLong recipe:
- `pack_concatenated`: short documents back to back; a document that overflows a sequence
  continues in the next one; the last partial sequence is dropped.
- `split_long`: each document (>= L tokens) starts a sequence and is cut into L-token pieces;
  its tail shorter than L is dropped.
- `pack_whole` (SFT): whole documents only, padded to L; a document that does not fit the
  open sequence starts the next one ("move") or is dropped ("drop"); documents longer than L
  are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedIndex:
    """Result of a packing rule over documents given in stream order.

    kept: positions (into the input order) of the documents that form the stream.
    starts: int64 [len(kept) + 1], stream offset of each kept document, in tokens.
    sequences: int64 [num_sequences, 3] rows (stream start, stream end, first document position).
    dropped_documents / dropped_tokens: what the rule left out, for the summary.
    """
    kept: np.ndarray
    starts: np.ndarray
    sequences: np.ndarray
    dropped_documents: int = 0
    dropped_tokens: int = 0


def stream_starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def pack_concatenated(lengths: np.ndarray, seq_length: int) -> PackedIndex:
    """Documents of `lengths` tokens back to back, cut every `seq_length` tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = stream_starts(lengths)
    num_sequences = int(starts[-1]) // seq_length
    seq_starts = np.arange(num_sequences, dtype=np.int64) * seq_length
    first = np.searchsorted(starts, seq_starts, side="right") - 1
    sequences = np.stack([seq_starts, seq_starts + seq_length, first], axis=1)
    # The tail that does not fill a whole sequence is dropped; so are documents wholly inside it.
    tail = int(starts[-1]) - num_sequences * seq_length
    return PackedIndex(np.arange(len(lengths)), starts, sequences.reshape(-1, 3),
                       dropped_documents=int((starts[:-1] >= num_sequences * seq_length).sum()),
                       dropped_tokens=tail)


def split_long(lengths: np.ndarray, seq_length: int) -> PackedIndex:
    """Documents of at least `seq_length` tokens, each cut into `seq_length`-token pieces."""
    lengths = np.asarray(lengths, dtype=np.int64)
    kept = np.flatnonzero(lengths >= seq_length)
    starts = stream_starts(lengths[kept])
    pieces = lengths[kept] // seq_length
    position = np.repeat(np.arange(len(kept), dtype=np.int64), pieces)
    piece_in_doc = np.arange(len(position), dtype=np.int64) - np.repeat(
        np.cumsum(pieces) - pieces, pieces)
    seq_starts = starts[position] + piece_in_doc * seq_length
    sequences = np.stack([seq_starts, seq_starts + seq_length, position], axis=1)
    short = lengths < seq_length
    return PackedIndex(kept, starts, sequences.reshape(-1, 3),
                       dropped_documents=int(short.sum()),
                       dropped_tokens=int(lengths[short].sum() + (lengths[kept] % seq_length).sum()))


def pack_whole(lengths: np.ndarray, seq_length: int, overflow: str = "move") -> PackedIndex:
    """Whole documents per sequence, padded to `seq_length`; see the module docstring."""
    if overflow not in ("move", "drop"):
        raise ValueError(f"overflow must be 'move' or 'drop', not {overflow!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    kept, rows = [], []
    dropped_documents = dropped_tokens = 0
    fill = seq_length  # tokens in the open sequence; "full" means none is open
    stream = 0
    for i, n in enumerate(lengths.tolist()):
        if n > seq_length or (overflow == "drop" and 0 < fill < seq_length and fill + n > seq_length):
            dropped_documents += 1
            dropped_tokens += n
            if n <= seq_length:
                fill = seq_length  # ProLong's rule: the overflowing document ends the sequence
            continue
        if fill + n > seq_length:
            rows.append([stream, stream + n, len(kept)])
            fill = n
        else:
            rows[-1][1] += n
            fill += n
        kept.append(i)
        stream += n
    kept_array = np.asarray(kept, dtype=np.int64)
    sequences = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return PackedIndex(kept_array, stream_starts(lengths[kept_array]), sequences,
                       dropped_documents, dropped_tokens)
