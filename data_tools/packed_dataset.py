"""The packed training dataset: sequences of exactly L tokens with their document boundaries.

A packed dataset is a folder written by `lce-data mix` or `lce-data sft`:
  packed.json                 metadata (recipe, sources, per-source token counts, seed, L,
                              tokenizer, max_token_id)
  order.npy                   int64 [N, 2]: (source, source sequence) of each training sequence
  source{k}.documents.npy     int64: document ids of source k in stream order
  source{k}.starts.npy        int64: stream offset of each of those documents (+ the total)
  source{k}.sequences.npy     int64 [M, 3]: (stream start, stream end, first document position)
Tokens stay in the sources' Megatron .bin files; every array is memory-mapped, so opening a
dataset reads only its metadata and `ds[i]` reads one sequence (O(documents in it)).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_tools.indexed import IndexedReader
from data_tools.packing import PackedIndex
from publishing.atomic import discard, publish_directory, temporary_path

FORMAT = "longctx-packed-v1"
METADATA_FILE = "packed.json"


@dataclass
class PackedSequence:
    """One training sequence (or a window of it).

    tokens: token ids, length L (or end - start for a window).
    doc_lengths: int32 lengths of the document pieces in order, summing to len(tokens); a piece
        continuing from the previous sequence, and padding, each count as a document.
    loss_mask: uint8, 1 where the token's loss counts; None when every token counts.
    """
    tokens: np.ndarray
    doc_lengths: np.ndarray
    loss_mask: Optional[np.ndarray]


class _Source:
    def __init__(self, folder: str, index: int, info: dict):
        self.name = info["name"]
        # Relative prefixes live inside the dataset folder (SFT writes its tokens there).
        self.reader = IndexedReader(os.path.join(folder, info["prefix"]))
        self.mask = (IndexedReader(os.path.join(folder, info["mask_prefix"]))
                     if info.get("mask_prefix") else None)
        base = os.path.join(folder, f"source{index}")
        self.documents = np.load(base + ".documents.npy", mmap_mode="r")
        self.starts = np.load(base + ".starts.npy", mmap_mode="r")
        self.sequences = np.load(base + ".sequences.npy", mmap_mode="r")


class PackedDataset:
    """Memory-mapped packed dataset; `ds[i]` is training sequence i, already in training order."""

    def __init__(self, path: str):
        folder = path
        metadata_path = os.path.join(folder, METADATA_FILE)
        if not os.path.exists(metadata_path):
            raise FileNotFoundError(
                f"{path!r} is not a packed dataset (no {METADATA_FILE}); build one with "
                f"`lce-data mix RECIPE --output DIR` or `lce-data sft`")
        with open(metadata_path) as f:
            self.metadata: dict = json.load(f)
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{metadata_path}: format {self.metadata.get('format')!r}, "
                             f"expected {FORMAT!r}; rebuild it with this version")
        self.path = folder
        self.seq_length: int = int(self.metadata["seq_length"])
        self.pad_id: int = int(self.metadata.get("pad_id", 0))
        # The largest token id any sequence can hold (padding included), to check against the
        # model's vocabulary before training; None for datasets packed before it was recorded.
        recorded = self.metadata.get("max_token_id")
        self.max_token_id: Optional[int] = None if recorded is None else int(recorded)
        self._sources = [_Source(folder, k, info)
                         for k, info in enumerate(self.metadata["sources"])]
        self._order = np.load(os.path.join(folder, "order.npy"), mmap_mode="r")
        self._check_order()
        self.has_loss_mask = any(s.mask is not None for s in self._sources)

    def _check_order(self) -> None:
        """Every (source, sequence) pair of order.npy names a sequence the sources hold: a
        damaged or hand-edited order would otherwise fail at the training step reading it."""
        order_file = os.path.join(self.path, "order.npy")
        if self._order.ndim != 2 or self._order.shape[1] != 2:
            raise ValueError(f"{order_file}: shape {self._order.shape}, expected (sequences, 2); "
                             f"rebuild the dataset with `lce-data mix`")
        if not len(self._order):
            return
        sources = np.asarray(self._order[:, 0])
        if sources.min() < 0 or sources.max() >= len(self._sources):
            bad = int(sources.max() if sources.max() >= len(self._sources) else sources.min())
            raise ValueError(f"{order_file} names source {bad}, but {METADATA_FILE} lists "
                             f"{len(self._sources)} source(s): the dataset is damaged; rebuild "
                             f"it with `lce-data mix`")
        sequences = np.asarray(self._order[:, 1])
        for index, source in enumerate(self._sources):
            picked = sequences[sources == index]
            if len(picked) and (picked.min() < 0 or picked.max() >= len(source.sequences)):
                raise ValueError(f"{order_file} names sequence {int(picked.max())} of source "
                                 f"{index} ({source.name}), which holds {len(source.sequences)}: "
                                 f"the dataset is damaged; rebuild it with `lce-data mix`")

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: int) -> PackedSequence:
        return self.get(i, 0, self.seq_length)

    def source_of(self, i: int) -> str:
        """Name of the source that sequence i comes from."""
        return self._sources[int(self._order[i, 0])].name

    def document_lengths(self, i: int) -> np.ndarray:
        """Document lengths (int64) of sequence i, padding included, as `get(i)` reports them,
        without reading its tokens: O(documents in the sequence) memory-mapped offsets."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of a dataset of {len(self)}")
        source_index, sequence = (int(v) for v in self._order[i % len(self)])
        source = self._sources[source_index]
        seq_start, seq_end, _ = (int(v) for v in source.sequences[sequence])
        first = int(np.searchsorted(source.starts, seq_start, side="right")) - 1
        last = int(np.searchsorted(source.starts, seq_end, side="left"))
        bounds = np.clip(np.asarray(source.starts[first:last + 1], dtype=np.int64), seq_start, seq_end)
        lengths = np.diff(np.unique(np.concatenate([[seq_start], bounds, [seq_end]])))
        padding = self.seq_length - (seq_end - seq_start)
        return np.concatenate([lengths, [padding]]) if padding else lengths

    def get(self, i: int, start: int = 0, end: Optional[int] = None) -> PackedSequence:
        """Tokens [start, end) of sequence i (token offsets within the sequence), reading only
        the documents that overlap that window."""
        if end is None:
            end = self.seq_length
        if not (0 <= start <= end <= self.seq_length):
            raise IndexError(f"window [{start}, {end}) is outside a sequence of "
                             f"{self.seq_length} tokens")
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of a dataset of {len(self)}")
        i %= len(self)
        source_index, sequence = (int(v) for v in self._order[i])
        source = self._sources[source_index]
        seq_start, seq_end, _ = (int(v) for v in source.sequences[sequence])
        width = end - start
        tokens = np.empty(width, dtype=source.reader.dtype)
        mask = np.zeros(width, dtype=np.uint8) if self.has_loss_mask else None
        pieces = []
        position = seq_start + start
        stop = min(seq_start + end, seq_end)
        # The document holding the window's first token; the binary search touches only
        # log2(documents) entries of the memory-mapped offsets.
        doc = int(np.searchsorted(source.starts, position, side="right")) - 1
        filled = 0
        while position < stop:
            doc_start = int(source.starts[doc])
            piece_end = min(int(source.starts[doc + 1]), stop)
            count = piece_end - position
            doc_id = int(source.documents[doc])
            tokens[filled:filled + count] = source.reader.get(doc_id, position - doc_start, count)
            if source.mask is not None:
                mask[filled:filled + count] = source.mask.get(doc_id, position - doc_start, count)
            elif mask is not None:
                mask[filled:filled + count] = 1
            pieces.append(count)
            filled += count
            position = piece_end
            doc += 1
        if filled < width:  # padding after the last document (SFT)
            tokens[filled:] = self.pad_id
            pieces.append(width - filled)
        return PackedSequence(tokens, np.asarray(pieces, dtype=np.int32), mask)


def write_packed(folder: str, metadata: dict, sources: list[tuple[dict, np.ndarray, PackedIndex]],
                 order: np.ndarray, staging: Optional[str] = None) -> None:
    """Write a packed dataset atomically: build in FOLDER.tmpPID, then rename into place.

    staging: an existing folder to build in instead, already holding files that belong
    to the dataset (SFT's tokens); it becomes FOLDER.
    sources: (info, document ids in input order, packing result) per source; info needs
    "name" and "prefix" (and "mask_prefix" for SFT) and is stored in the metadata.
    """
    tmp = staging or staging_folder(folder)
    if staging is None:
        discard(tmp)
        os.makedirs(tmp)
    try:
        infos = []
        for k, (info, documents, packed) in enumerate(sources):
            base = os.path.join(tmp, f"source{k}")
            np.save(base + ".documents.npy", np.asarray(documents, np.int64)[packed.kept])
            np.save(base + ".starts.npy", packed.starts)
            np.save(base + ".sequences.npy", packed.sequences)
            infos.append(info)
        np.save(os.path.join(tmp, "order.npy"), np.asarray(order, dtype=np.int64).reshape(-1, 2))
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump({"format": FORMAT, **metadata, "sources": infos}, f, indent=2)
        publish_directory(tmp, folder)
    except BaseException:
        discard(tmp)
        raise


def staging_folder(folder: str) -> str:
    """The temporary name a packed dataset is built under before it is renamed to `folder`."""
    return temporary_path(os.path.abspath(folder).rstrip(os.sep))
