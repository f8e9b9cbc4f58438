"""Reading corpora: JSON lines (plain, .gz, .zst), Parquet files and plain-text folders.

Inputs are read in chunks of raw records (`RawChunk`) by the main process; `parse_chunk` turns a
chunk into texts (and group keys) in a worker. Every problem is a `BadRecord` naming the file,
the line (or row) number, what is wrong and how to fix it.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst",
                  ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CHUNK_BYTES = 4 << 20


@dataclass
class BadRecord:
    path: str
    line: int
    problem: str
    fix: str = "fix the record or pass --skip-bad to skip and count such lines"

    def message(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}. {self.fix}"

    def as_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "problem": self.problem}


class InputError(ValueError):
    """A bad record when --skip-bad is off; str() names the file, the line and the fix."""

    def __init__(self, record: BadRecord):
        super().__init__(record.message())
        self.record = record


@dataclass
class RawChunk:
    """Records of one file: JSON lines as bytes, or already-decoded Parquet/text values.

    JSON lines travel as one `blob` of whole lines, split only in the worker: one bytes object
    pickles as a single copy, where a list of lines costs the main process per line.
    """
    path: str
    kind: str  # "jsonl", "rows" (Parquet: list of dicts) or "text" (one file = one document)
    first_line: int  # 1-based line or row number of the first record
    records: list = field(default_factory=list)  # Parquet rows / the text file's bytes
    bad: list = field(default_factory=list)  # problems found while reading (truncated stream)
    blob: bytes = b""  # JSON lines: whole lines joined by b"\n", no trailing newline
    num_lines: int = 0  # JSON lines in `blob`
    group: Optional[str] = None  # plain text: the repository folder the file belongs to

    def raw_records(self) -> list:
        if self.kind == "jsonl":
            return self.blob.split(b"\n") if self.num_lines else []
        return self.records

    @property
    def num_records(self) -> int:
        return self.num_lines if self.kind == "jsonl" else len(self.records)


def list_input_files(paths: Sequence[str]) -> list[str]:
    """Expand folders (recursively, sorted, hidden files skipped) into files."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, n) for n in names if not n.startswith("."))
            files.extend(sorted(found))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no input files under {list(paths)}")
    return files


def text_file_groups(paths: Sequence[str], files: Sequence[str]) -> dict[str, str]:
    """Each of `files` (list_input_files(paths)) under a folder input -> its repository: the
    folder's top-level entry holding it.

    `--input repos/` with repos/proj_a/src/x.py groups x.py under repos/proj_a, so a checked-out
    repository becomes one document however deep its files lie. Files directly in the input
    folder, and files given by name, group by the folder they are in.
    """
    folders = [p for p in paths if os.path.isdir(p)]
    groups = {}
    for file in files:
        for folder in folders:
            parts = os.path.relpath(file, folder).split(os.sep)
            if parts[0] != os.pardir:
                groups[file] = os.path.join(folder, parts[0]) if len(parts) > 1 else folder
                break
    return groups


def input_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _decompressed_blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    """The file's bytes, decompressed for .gz/.zst; EOFError if a compressed stream is cut."""
    if path.endswith(".zst"):
        yield from _zstd_blocks(path, block_bytes)
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:  # gzip raises EOFError itself on a cut stream
        while True:
            block = f.read(block_bytes)
            if not block:
                return
            yield block


def _zstd_blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    # zstandard's stream_reader reports a truncated frame as a clean end of file, so frames
    # are followed by hand: a frame still open when the bytes run out is an error.
    import zstandard

    decompressor = zstandard.ZstdDecompressor().decompressobj()
    frame_open = False
    with open(path, "rb") as f:
        while True:
            compressed = f.read(block_bytes)
            if not compressed:
                break
            while compressed:
                try:
                    block = decompressor.decompress(compressed)
                except zstandard.ZstdError as error:
                    raise EOFError(f"corrupt zstd data ({error})") from None
                frame_open = not decompressor.eof
                if block:
                    yield block
                compressed = decompressor.unused_data if decompressor.eof else b""
                if decompressor.eof:
                    decompressor = zstandard.ZstdDecompressor().decompressobj()
    if frame_open:
        raise EOFError("the last zstd frame has no end")


def _read_jsonl(path: str, chunk_bytes: int) -> Iterator[RawChunk]:
    line_no = 1
    pending = b""
    blocks = _decompressed_blocks(path, chunk_bytes)
    while True:
        try:
            block = next(blocks, b"")
        except (EOFError, OSError) as error:
            # The partial line in `pending` is lost with the stream: report it there.
            yield RawChunk(path, "jsonl", line_no, [], [BadRecord(
                path, line_no, f"compressed stream is truncated or corrupt ({error})",
                "re-create the file; --skip-bad keeps the lines before this one")])
            return
        if not block:
            break
        data = pending + block
        end = data.rfind(b"\n")
        if end < 0:
            pending = data
            continue
        pending = data[end + 1:]
        lines = data.count(b"\n", 0, end) + 1
        yield RawChunk(path, "jsonl", line_no, blob=data[:end], num_lines=lines)
        line_no += lines
    if pending:
        yield RawChunk(path, "jsonl", line_no, blob=pending, num_lines=1)


def _read_parquet(path: str, columns: Sequence[str], chunk_rows: int = 8192) -> Iterator[RawChunk]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    present = set(parquet.schema_arrow.names)
    wanted = [c for c in columns if c in present]
    row = 1
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
        rows = batch.to_pylist()
        yield RawChunk(path, "rows", row, rows)
        row += len(rows)


def _read_text_file(path: str, group: Optional[str]) -> Iterator[RawChunk]:
    with open(path, "rb") as f:
        yield RawChunk(path, "text", 1, [f.read()], group=group)


def read_chunks(path: str, columns: Sequence[str], chunk_bytes: int = CHUNK_BYTES,
                group: Optional[str] = None) -> Iterator[RawChunk]:
    """Raw records of one input file in chunks of about `chunk_bytes` bytes.

    `group` names the repository of a plain-text file (see text_file_groups).
    """
    kind = input_kind(path)
    if kind == "jsonl":
        return _read_jsonl(path, chunk_bytes)
    if kind == "parquet":
        return _read_parquet(path, columns)
    return _read_text_file(path, group)


def _text_of(record: dict, keys: Sequence[str], path: str, line: int) -> tuple[Optional[str], Optional[BadRecord]]:
    values = []
    for key in keys:
        if key not in record:
            present = ", ".join(sorted(map(str, record))[:8])
            return None, BadRecord(path, line, f"missing key {key!r} (keys present: {present})",
                                   "choose the text field with --json-keys, or --skip-bad")
        value = record[key]
        if not isinstance(value, str):
            return None, BadRecord(path, line, f"key {key!r} holds {type(value).__name__}, "
                                               f"not a string", "fix the record or --skip-bad")
        values.append(value)
    text = "\n\n".join(values)
    if not text.strip():
        return None, BadRecord(path, line, "empty text", "drop the record or pass --skip-bad")
    return text, None


def _decode_utf8(raw: bytes, path: str, line: int):
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        return None, BadRecord(path, line, f"invalid UTF-8 at byte {error.start}",
                               "re-encode the file as UTF-8 or pass --skip-bad")


def _lone_surrogate(value, where: str = "") -> Optional[tuple[str, int, int]]:
    """(key path, character index, code unit) of the first unpaired UTF-16 surrogate, or None.

    JSON's "\\ud800" escapes decode to such characters; no tokenizer can encode them
    (they are not Unicode scalar values)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return where, error.start, ord(value[error.start])
        return None
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = _lone_surrogate(item, f"{where}[{key!r}]" if where or isinstance(key, int)
                                else str(key))
        if found:
            return found
    return None


def iter_records(chunk: RawChunk):
    """(line, value, problem) per record: value is a dict (JSON/Parquet) or a str (text file)."""
    for record in chunk.bad:
        yield record.line, None, record
    for i, raw in enumerate(chunk.raw_records()):
        line = chunk.first_line + i
        if chunk.kind == "rows":
            yield line, raw, None
            continue
        if chunk.kind == "jsonl" and not raw.strip():
            continue  # blank lines carry nothing and are not errors in JSON lines
        decoded, problem = _decode_utf8(raw, chunk.path, line)
        if problem is not None or chunk.kind == "text":
            yield line, decoded, problem
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as error:
            yield line, None, BadRecord(chunk.path, line,
                                        f"malformed JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            yield line, None, BadRecord(chunk.path, line,
                                        f"a JSON {type(record).__name__}, not an object")
            continue
        # Only a \u escape can put a surrogate in decoded text: valid UTF-8 never holds one,
        # so the (C-speed) byte search keeps the walk off almost every record.
        if b"\\ud" in raw or b"\\uD" in raw:
            found = _lone_surrogate(record)
            if found:
                where, index, unit = found
                yield line, None, BadRecord(
                    chunk.path, line, f"key {where} holds an unpaired UTF-16 surrogate "
                                      f"(\\u{unit:04x}) at character {index}, which is not text",
                    "repair the record (a \\u escape lost half of its pair) or pass --skip-bad")
                continue
        yield line, record, None


def parse_chunk(chunk: RawChunk, keys: Sequence[str], group_key: Optional[str],
                lines: Optional[list] = None):
    """Texts, group keys (or None) and problems of one chunk, in input order.

    `lines`, if given, receives each text's line (or row) number.
    """
    texts: list[str] = []
    groups: Optional[list[str]] = [] if group_key else None
    bad = []
    for line, record, problem in iter_records(chunk):
        if problem is None and isinstance(record, str):
            if not record.strip():
                problem = BadRecord(chunk.path, line, "empty text",
                                    "drop the file or pass --skip-bad")
            text, group = record, chunk.group or os.path.dirname(chunk.path)
        elif problem is None:
            text, problem = _text_of(record, keys, chunk.path, line)
            if problem is None and group_key is not None and record.get(group_key) is None:
                problem = BadRecord(chunk.path, line, f"missing group key {group_key!r}",
                                    "fix --group-by or pass --skip-bad")
            group = str(record.get(group_key)) if group_key else None
        if problem is not None:
            bad.append(problem)
            continue
        texts.append(text)
        if groups is not None:
            groups.append(group)
        if lines is not None:
            lines.append(line)
    return texts, groups, bad
