"""Megatron's indexed dataset format (PREFIX.bin + PREFIX.idx), read and written without torch.

Layout of PREFIX.idx (all little-endian), byte-compatible with
megatron.core.datasets.indexed_dataset:
  9-byte magic b"MMIDIDX\\x00\\x00", version <Q = 1, dtype code <B,
  sequence count <Q, document-index length <Q (documents + 1),
  int32 sequence lengths (tokens), int64 byte pointers into .bin, int64 document indices.
PREFIX.bin holds the token ids of every sequence back to back.

We write one sequence per document (as Megatron's preprocess_data.py does without sentence
splitting), and read any file Megatron writes; a "document" below is one Megatron sequence,
which is also what Megatron's GPTDataset packs.

Importing megatron.core costs seconds and pulls torch; this module needs only numpy.
"""
from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np

from data_tools.outputs import write_failure
from publishing.atomic import discard, publish, temporary_path

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}
DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype Megatron would pick for a vocabulary of `vocab_size` ids."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class IndexedWriter:
    """Writes PREFIX.bin/.idx under temporary names; `finalize` renames them into place.

    An interrupted run leaves only *.tmp files, never a .bin/.idx pair that looks complete.
    Documents are appended in bulk: a flat token array plus the length of each document.
    """

    def __init__(self, prefix: str, dtype: type = np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype} has no code in Megatron's indexed format")
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        self._bin_tmp = temporary_path(bin_path(prefix))
        self._idx_tmp = temporary_path(idx_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._length_chunks: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id: Optional[int] = None  # largest id written so far

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` is every document's ids back to back, `lengths` in tokens."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens given")
        if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2**31-1 tokens does not fit the .idx format")
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._write(tokens.tobytes())
        self._note_max(tokens)
        self._length_chunks.append(lengths.astype(np.int32))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def copy_from(self, reader: "IndexedReader", chunk_tokens: int = 1 << 24) -> None:
        """Append every document of `reader` (same dtype), copying the .bin in large chunks."""
        if reader.dtype != self.dtype:
            raise ValueError(
                f"{reader.prefix} stores {np.dtype(reader.dtype).name}, this output "
                f"{np.dtype(self.dtype).name}: merge only datasets of one tokenizer")
        for start in range(0, len(reader.tokens), chunk_tokens):
            chunk = reader.tokens[start:start + chunk_tokens]
            self._write(chunk.tobytes())
            self._note_max(chunk)
        self._length_chunks.append(reader.lengths.astype(np.int32))
        self.num_documents += len(reader)
        self.num_tokens += int(reader.lengths.sum(dtype=np.int64))

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as error:
            raise write_failure(bin_path(self.prefix), error) from None

    def _note_max(self, tokens: np.ndarray) -> None:
        if len(tokens):
            largest = int(tokens.max())
            self.max_token_id = largest if self.max_token_id is None else max(self.max_token_id,
                                                                              largest)

    def finalize(self) -> None:
        """Write the index and move both files to their final names (the .idx last)."""
        lengths = (np.concatenate(self._length_chunks) if self._length_chunks
                   else np.zeros(0, np.int32))
        try:
            self._bin.close()  # flushes the last buffered tokens
        except OSError as error:
            raise write_failure(bin_path(self.prefix), error) from None
        try:
            write_index(self._idx_tmp, self.dtype, lengths)
        except OSError as error:
            raise write_failure(idx_path(self.prefix), error) from None
        # Remove a stale index first: between the two renames the new .bin must not be
        # paired with an old .idx.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        publish(self._bin_tmp, bin_path(self.prefix))
        publish(self._idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        """Close and delete the temporary files."""
        try:
            self._bin.close()
        except OSError:
            pass  # the buffered tail could not be written (a full disk): it is discarded anyway
        discard(self._bin_tmp, self._idx_tmp)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(path: str, dtype: type, lengths: np.ndarray) -> None:
    """Write a .idx for documents of `lengths` tokens stored back to back, one sequence each."""
    lengths = np.asarray(lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(document_indices.tobytes())


class IndexedReader:
    """Memory-mapped view of PREFIX.bin/.idx; `reader[i]` is document i's tokens (a view).

    Nothing is read until it is indexed: the index arrays and the tokens are memmaps.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        path = idx_path(prefix)
        if not os.path.exists(path) or not os.path.exists(bin_path(prefix)):
            raise FileNotFoundError(
                f"no indexed dataset at {prefix!r}: expected {path} and {bin_path(prefix)} "
                f"(give the prefix without .bin/.idx; build it with `lce-data preprocess`)")
        with open(path, "rb") as f:
            header = f.read(_HEADER_BYTES)
        rebuild = "rebuild the dataset (lce-data preprocess / import-mds / merge)"
        magic = header[:len(INDEX_MAGIC)]
        if len(header) < _HEADER_BYTES and magic == INDEX_MAGIC[:len(magic)]:
            raise ValueError(f"{path}: {len(header)} bytes, shorter than the {_HEADER_BYTES}-byte "
                             f"header of a Megatron index: the file is cut short; {rebuild}")
        if header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise ValueError(f"{path} is not a Megatron index: magic {header[:9]!r}")
        offset = len(INDEX_MAGIC)
        (version,) = struct.unpack_from("<Q", header, offset)
        if version != INDEX_VERSION:
            raise ValueError(f"{path}: index version {version}, only {INDEX_VERSION} is known")
        code = header[offset + 8]
        if code not in DTYPE_FROM_CODE:
            raise ValueError(f"{path}: token dtype code {code} is not one of the index format's "
                             f"({', '.join(map(str, sorted(DTYPE_FROM_CODE)))}): the index is "
                             f"damaged; {rebuild}")
        self.dtype = DTYPE_FROM_CODE[code]
        num_sequences, num_doc_indices = struct.unpack_from("<QQ", header, offset + 9)
        index_bytes = os.path.getsize(path)
        needed = _HEADER_BYTES + 12 * num_sequences + 8 * num_doc_indices
        if needed > index_bytes:  # Megatron may append a per-document modes array
            raise ValueError(f"{path}: {index_bytes:,} bytes, but its header's {num_sequences:,} "
                             f"documents need {needed:,}: the index is damaged or cut short; "
                             f"{rebuild}")
        index = np.memmap(path, mode="r", dtype=np.uint8)
        pos = _HEADER_BYTES
        self.lengths = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=pos)
        pos += 4 * num_sequences
        self.pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=pos)
        pos += 8 * num_sequences
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=num_doc_indices,
                                              offset=pos)
        bin_bytes = os.path.getsize(bin_path(prefix))
        itemsize = np.dtype(self.dtype).itemsize
        expected = (int(self.pointers[-1]) + itemsize * int(self.lengths[-1])
                    if num_sequences else 0)
        if bin_bytes < expected:
            raise ValueError(f"{bin_path(prefix)} has {bin_bytes} bytes, its index needs "
                             f"{expected}: the .bin is truncated")
        self.tokens = (np.memmap(bin_path(prefix), mode="r", dtype=self.dtype)
                       if bin_bytes else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def largest_token_id(self, chunk_tokens: int = 1 << 24) -> Optional[int]:
        """The largest token id in the .bin (None if it holds no token). Reads the whole .bin
        (about a second per GB), in chunks through read() rather than the memory map, so that
        the pages read do not stay in this process's memory; datasets written by `lce-data`
        record it in PREFIX.summary.json instead."""
        largest = None
        with open(bin_path(self.prefix), "rb") as f:
            while True:
                chunk = np.fromfile(f, dtype=self.dtype, count=chunk_tokens)
                if not len(chunk):
                    return largest
                value = int(chunk.max())
                largest = value if largest is None else max(largest, value)

    def token_offset(self, i: int) -> int:
        """Position of document i's first token in the .bin, in tokens."""
        return int(self.pointers[i]) // np.dtype(self.dtype).itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document i, a view into the memmap."""
        size = int(self.lengths[i])
        if length is None:
            length = size - offset
        start = self.token_offset(i) + offset
        return self.tokens[start:start + length]
