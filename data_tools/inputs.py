"""Reading corpora: JSON lines (plain, .gz, .zst), Parquet files and plain-text folders.

Inputs are read in chunks of raw records (`RawChunk`) by the main process; `parse_chunk` turns a
chunk into texts (and group keys) in a worker. Every problem is a `BadRecord` naming the file,
the line (or row) number, what is wrong and how to fix it.
"""
from __future__ import annotations

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


# Compressed input is fed to the decompressor in pieces of this size, so that a failure costs at
# most one piece's output and its position is known to within a piece.
COMPRESSED_PIECE_BYTES = 1 << 16


class StreamCut(Exception):
    """A compressed stream that ends before its end marker (`truncated`) or holds corrupt data.

    Every byte decompressed before it has already been handed out. `offset`: compressed bytes
    consumed when it was found; `file_bytes`: the file's size."""

    def __init__(self, reason: str, offset: int, file_bytes: int, truncated: bool, tool: str):
        super().__init__(reason)
        self.reason, self.offset, self.file_bytes = reason, offset, file_bytes
        self.truncated, self.tool = truncated, tool


def _decompressed_blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    """The file's bytes in blocks of about `block_bytes`, decompressed for .gz/.zst.

    A cut or corrupt compressed stream yields everything decompressed before the damage, then
    raises StreamCut: gzip.open and zstandard's stream_reader instead lose the whole block being
    read (gzip) or report a cut frame as a clean end (zstd).
    """
    lower = path.lower()
    if lower.endswith(".gz"):
        import zlib

        # wbits 31: a gzip member, its CRC-32 and length checked at its end.
        yield from _stream_blocks(path, block_bytes, lambda: zlib.decompressobj(wbits=31),
                                  zlib.error, "gzip", padding=b"\x00")
    elif lower.endswith(".zst"):
        import zstandard

        yield from _stream_blocks(path, block_bytes,
                                  lambda: zstandard.ZstdDecompressor().decompressobj(),
                                  zstandard.ZstdError, "zstd")
    else:
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                if not block:
                    return
                yield block


def _stream_blocks(path: str, block_bytes: int, new_decompressor, errors, tool: str,
                   padding: bytes = b"") -> Iterator[bytes]:
    # Members (gzip) or frames (zstd) are followed by hand: several may follow each other, and
    # one still open when the bytes run out is a cut stream. gzip allows zero bytes of padding
    # after a member.
    file_bytes = os.path.getsize(path)
    decompressor = new_decompressor()
    fed = False  # the current member/frame has received bytes
    offset = 0
    out: list[bytes] = []
    buffered = 0
    with open(path, "rb") as f:
        while True:
            piece = f.read(COMPRESSED_PIECE_BYTES)
            if not piece:
                break
            while piece:
                if decompressor.eof:
                    stripped = piece.lstrip(padding) if padding else piece
                    offset += len(piece) - len(stripped)
                    piece = stripped
                    if not piece:
                        break
                    decompressor, fed = new_decompressor(), False
                saved = decompressor.copy() if hasattr(decompressor, "copy") else None
                try:
                    block = decompressor.decompress(piece)
                except errors as error:
                    if saved is not None:  # zlib: recover the output up to the damaged byte
                        good, used = _decompress_until_error(saved, piece, errors)
                        out.append(good)
                    else:  # zstd objects cannot be copied: this piece's output is lost
                        used = 0
                    if any(out):
                        yield b"".join(out)
                    raise StreamCut(f"corrupt {tool} data at compressed byte {offset + used:,} "
                                    f"({error})", offset + used, file_bytes, False,
                                    tool) from None
                fed = True
                rest = decompressor.unused_data if decompressor.eof else b""
                offset += len(piece) - len(rest)
                piece = rest
                if block:
                    out.append(block)
                    buffered += len(block)
                    if buffered >= block_bytes:
                        yield b"".join(out)
                        out, buffered = [], 0
    if out:
        yield b"".join(out)
    if fed and not decompressor.eof:
        raise StreamCut(f"the file ends at byte {file_bytes:,} inside a {tool} "
                        f"{'member' if tool == 'gzip' else 'frame'}, before its end marker",
                        offset, file_bytes, True, tool)


def _decompress_until_error(decompressor, piece: bytes, errors) -> tuple[bytes, int]:
    """(output, bytes of `piece` consumed) feeding `piece` a byte at a time until it fails."""
    output = []
    for used in range(len(piece)):
        try:
            output.append(decompressor.decompress(piece[used:used + 1]))
        except errors:
            return b"".join(output), used
    return b"".join(output), len(piece)


def _cut_stream_record(path: str, first_lost_line: int, partial_bytes: int,
                       cut: StreamCut) -> BadRecord:
    """The bad record of a cut/corrupt stream: names the last complete line and the cut."""
    last_good = first_lost_line - 1
    kept = f"after line {last_good:,}, the last complete one" if last_good else \
        "before the first complete line"
    partial = (f"; line {first_lost_line:,} is incomplete ({partial_bytes:,} bytes)"
               if partial_bytes else "")
    if cut.truncated:
        problem = f"the {cut.tool} stream is cut off {kept}: {cut.reason}{partial}"
        fix = (f"pass --skip-bad to keep lines 1-{last_good:,}, or re-create the file from its "
               f"source (`{cut.tool} -t FILE` tests a file)") if last_good else \
            f"re-create the file from its source (`{cut.tool} -t FILE` tests a file)"
    else:
        problem = f"{cut.reason}, {kept}{partial}"
        fix = "re-create the file from its source" + (
            f": corrupt {cut.tool} data can garble the lines before it unnoticed, so "
            f"--skip-bad (which keeps lines 1-{last_good:,}) is a last resort" if last_good else "")
    return BadRecord(path, first_lost_line, problem, fix)


def _read_jsonl(path: str, chunk_bytes: int) -> Iterator[RawChunk]:
    line_no = 1
    pending = b""
    blocks = _decompressed_blocks(path, chunk_bytes)
    while True:
        try:
            block = next(blocks, b"")
        except StreamCut as cut:
            # The lines before `pending` have all been handed out; `pending` (a line without
            # its newline) is lost with the rest of the stream.
            yield RawChunk(path, "jsonl", line_no, [], [
                _cut_stream_record(path, line_no, len(pending), cut)])
            return
        except OSError as error:
            yield RawChunk(path, "jsonl", line_no, [], [BadRecord(
                path, line_no, f"reading the file failed after line {line_no - 1:,} ({error})",
                "check the file and its disk; --skip-bad keeps the lines before this one")])
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
