"""ProLong's released training data (mosaicml-streaming MDS shards) -> one indexed dataset.

ProLong (Gao et al., arXiv 2410.02660; princeton-nlp/ProLong) published its 64K and 512K
training data tokenized with Llama-3 and already packed: one folder per source (book-65536,
fineweb-edu, ...), each made of parts `procNN-MM/` (one per packing process) holding an
index.json and MDS shards. A sample is one packed training sequence: `input_ids` (its tokens),
`indices` ([documents, 2]: the [start, end) token range of each document in it), `domain`
and sometimes `length`. `import_mds` writes one document per range, the parts in numeric
order, each part's shards and samples in stored order.

The MDS format (mosaicml-streaming, index version 2), read here without the library:
- index.json: {"version": 2, "shards": [...]}; each entry gives the columns (column_names,
  column_encodings, column_sizes: bytes per sample, or null where each sample stores its own
  size), compression, raw_data {basename, bytes} and the sample count.
- a shard file, little-endian: uint32 n (samples); uint32 offsets[n + 1] (each sample's first
  byte in the file, then the file's size); the shard's writer settings as JSON; the samples.
- a sample: a uint32 size for each column without a fixed size, in column order, then the
  columns' bytes in column order.
- "ndarray[:DTYPE[:SHAPE]]": without DTYPE, one dtype-code byte; without SHAPE, one byte
  (ndim << 2 | code of the shape's unsigned dtype) and the shape; then the values (C order).
  "str": UTF-8; "int": int64; "uint32", "int64", ...: one scalar of that type.
Only numpy and the standard library are imported.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from data_tools.indexed import IndexedWriter, token_dtype
from data_tools.preprocess import ProgressBar
from data_tools.outputs import check_output_location, empty_output_error
from data_tools.summary import (SUMMARY_SUFFIX, remove_stale_summary, stage_summary,
                                summary_path)
from data_tools.tokenizer import (LLAMA3_NUM_BPE_RANKS, llama3_special_tokens,
                                  llama3_vocabulary, load_tokenizer)
from publishing.atomic import discard, publish

INDEX_FILE = "index.json"
INDEX_VERSION = 2
REQUIRED_COLUMNS = ("input_ids", "indices")
# Part folders as ProLong's packing tool (CodeCreator/datatools) names them: procNN-MM, and
# jobJJ-KK_procNN-MM when it ran as several jobs.
PART_NAME = re.compile(r"^(job\d+-\d+_)?proc\d+-\d+$")
NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16",
                  32: "uint32", 33: "int32", 34: "float32", 64: "uint64", 65: "int64",
                  66: "float64"}
NDARRAY_SHAPE_DTYPES = {0: "<u1", 1: "<u2", 2: "<u4", 3: "<u8"}
SCALAR_DTYPES = {"int": "<i8", "uint8": "<u1", "uint16": "<u2", "uint32": "<u4",
                 "uint64": "<u8", "int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
                 "float16": "<f2", "float32": "<f4", "float64": "<f8"}
REDOWNLOAD = "Download this part again"


class MDSError(ValueError):
    """MDS data that cannot be imported; the message names the file (and sample) and the fix."""


class _SampleProblem(Exception):
    """A problem inside one sample, located (shard file, sample) by the caller."""


@dataclass
class Column:
    name: str
    encoding: str
    size: Optional[int]  # bytes per sample; None: each sample stores its size


@dataclass
class Shard:
    path: str
    part: str
    index_path: str
    number: int  # position in its index.json
    samples: int
    bytes: int
    columns: list


def _numeric_order(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_parts(source: str) -> list[tuple[str, str]]:
    """(name, folder) of each part of a source folder, in numeric order (proc2 before proc10).

    A folder holding its own index.json and no procNN-MM/ parts is one part.
    """
    if not os.path.isdir(source):
        raise MDSError(f"{source}: no such folder. Give one downloaded source folder of "
                       f"ProLong's data, such as prolong-data-64K/book-65536")
    names = sorted((n for n in os.listdir(source)
                    if PART_NAME.match(n) and os.path.isdir(os.path.join(source, n))),
                   key=_numeric_order)
    if names:
        for name in names:
            if not os.path.isfile(os.path.join(source, name, INDEX_FILE)):
                raise MDSError(f"{os.path.join(source, name)}: part folder without {INDEX_FILE}. "
                               f"The download is incomplete. {REDOWNLOAD}")
        return [(name, os.path.join(source, name)) for name in names]
    if os.path.isfile(os.path.join(source, INDEX_FILE)):
        return [(os.path.basename(os.path.normpath(source)), source)]
    nested = sorted(n for n in os.listdir(source)
                    if os.path.isfile(os.path.join(source, n, INDEX_FILE)))
    hint = (f"; its subfolders {nested[:4]}{' ...' if len(nested) > 4 else ''} are sources: "
            f"import each one separately" if nested else "")
    raise MDSError(f"{source}: no {INDEX_FILE} and no procNN-MM/ part folders holding one. Give "
                   f"one source folder of ProLong's data (e.g. book-65536) or one part{hint}")


def _column_size(column: Column) -> Optional[int]:
    """The fixed size an encoding implies, None if variable or unknown to us."""
    if column.encoding in SCALAR_DTYPES:
        return np.dtype(SCALAR_DTYPES[column.encoding]).itemsize
    fields = column.encoding.split(":")
    if fields[0] == "ndarray" and len(fields) == 3:
        shape = [int(d) for d in fields[2].split(",")]
        return int(np.prod(shape)) * np.dtype(fields[1]).itemsize
    return None


def _parse_columns(entry: dict, where: str) -> list:
    names = entry.get("column_names")
    encodings = entry.get("column_encodings")
    sizes = entry.get("column_sizes")
    if not (isinstance(names, list) and isinstance(encodings, list) and isinstance(sizes, list)
            and len(names) == len(encodings) == len(sizes)):
        raise MDSError(f"{where}: column_names, column_encodings and column_sizes must be lists "
                       f"of one length. index.json is damaged. {REDOWNLOAD}")
    columns = [Column(str(n), str(e), s) for n, e, s in zip(names, encodings, sizes)]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise MDSError(f"{where}: no column {' and no column '.join(missing)} (columns: {names}). "
                       f"import-mds reads ProLong's packed data, whose samples have input_ids and "
                       f"indices; give a folder of that data")
    for column in columns:
        fields = column.encoding.split(":")
        if fields[0] == "ndarray" and len(fields) > 1 and fields[1] not in NDARRAY_DTYPES.values():
            raise MDSError(f"{where}: column {column.name} has the encoding {column.encoding!r}, "
                           f"whose dtype MDS does not define. index.json is damaged. {REDOWNLOAD}")
        if column.name in REQUIRED_COLUMNS and fields[0] != "ndarray":
            raise MDSError(f"{where}: column {column.name} is encoded as {column.encoding!r}; "
                           f"ProLong's data stores it as ndarray (e.g. 'ndarray:uint32')")
        if column.size is not None and (not isinstance(column.size, int) or column.size < 0):
            raise MDSError(f"{where}: column {column.name} has size {column.size!r}; sizes are "
                           f"byte counts or null. index.json is damaged. {REDOWNLOAD}")
        try:
            implied = _column_size(column)
        except (ValueError, TypeError):
            raise MDSError(f"{where}: column {column.name} has an unreadable encoding "
                           f"{column.encoding!r}") from None
        if implied is not None and column.size != implied:
            raise MDSError(f"{where}: column {column.name} ({column.encoding}) is {implied} bytes "
                           f"per sample, index.json says {column.size}. index.json is damaged. "
                           f"{REDOWNLOAD}")
    return columns


def read_index(part: str, folder: str) -> list:
    """The shards that `folder`/index.json lists, checked; raises MDSError naming the entry."""
    path = os.path.join(folder, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MDSError(f"{path}: not a readable JSON file ({error}). {REDOWNLOAD}") from None
    version = index.get("version") if isinstance(index, dict) else None
    if version != INDEX_VERSION:
        raise MDSError(f"{path}: index version {version!r}; import-mds reads mosaicml-streaming's "
                       f"version {INDEX_VERSION} (ProLong's release)")
    entries = index.get("shards")
    if not isinstance(entries, list):
        raise MDSError(f"{path}: no 'shards' list. index.json is damaged. {REDOWNLOAD}")
    shards = []
    for number, entry in enumerate(entries):
        raw = entry.get("raw_data") if isinstance(entry, dict) else None
        basename = raw.get("basename") if isinstance(raw, dict) else None
        where = f"{path}: shard {number}" + (f" ({basename})" if basename else "")
        if not isinstance(basename, str) or not isinstance(raw.get("bytes"), int):
            raise MDSError(f"{where}: no raw_data basename and bytes. index.json is damaged. "
                           f"{REDOWNLOAD}")
        if entry.get("format") != "mds" or entry.get("version") != INDEX_VERSION:
            raise MDSError(f"{where}: format {entry.get('format')!r} version "
                           f"{entry.get('version')!r}; import-mds reads MDS shards, version "
                           f"{INDEX_VERSION}")
        if entry.get("compression"):
            raise MDSError(f"{where}: compressed ({entry['compression']}); import-mds reads "
                           f"uncompressed shards, as ProLong released them")
        samples = entry.get("samples")
        if not isinstance(samples, int) or samples < 0:
            raise MDSError(f"{where}: sample count {samples!r}. index.json is damaged. "
                           f"{REDOWNLOAD}")
        shards.append(Shard(path=os.path.join(folder, basename), part=part, index_path=path,
                            number=number, samples=samples, bytes=raw["bytes"],
                            columns=_parse_columns(entry, where)))
    return shards


def check_shard_files(shards: list) -> None:
    """Every shard file exists with the size its index.json gives (before anything is read)."""
    for shard in shards:
        if not os.path.isfile(shard.path):
            raise MDSError(f"{shard.path}: missing (shard {shard.number} of {shard.index_path}). "
                           f"The download is incomplete. {REDOWNLOAD}")
        size = os.path.getsize(shard.path)
        if size != shard.bytes:
            raise MDSError(f"{shard.path}: {size:,} bytes, but shard {shard.number} of "
                           f"{shard.index_path} has {shard.bytes:,}: the file is truncated or "
                           f"not the one index.json describes. {REDOWNLOAD}")


def _decode_ndarray(data: np.ndarray, begin: int, end: int, encoding: str) -> np.ndarray:
    fields = encoding.split(":")
    pos = begin
    if len(fields) >= 2:
        dtype = np.dtype(fields[1])
    else:
        if pos >= end:
            raise _SampleProblem("an ndarray without its dtype byte")
        code = int(data[pos])
        pos += 1
        if code not in NDARRAY_DTYPES:
            raise _SampleProblem(f"unknown ndarray dtype code {code}")
        dtype = np.dtype(NDARRAY_DTYPES[code])
    if len(fields) == 3:
        shape = tuple(int(d) for d in fields[2].split(","))
    else:
        if pos >= end:
            raise _SampleProblem("an ndarray without its shape")
        byte = int(data[pos])
        pos += 1
        ndim, shape_dtype = byte >> 2, np.dtype(NDARRAY_SHAPE_DTYPES[byte & 3])
        if pos + ndim * shape_dtype.itemsize > end:
            raise _SampleProblem("an ndarray whose shape runs past the column's bytes")
        shape = tuple(int(d) for d in np.frombuffer(data, shape_dtype, count=ndim, offset=pos))
        pos += ndim * shape_dtype.itemsize
    dtype = dtype.newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    if pos + count * dtype.itemsize != end:
        raise _SampleProblem(f"an ndarray of shape {shape} ({dtype.name}) needs "
                             f"{count * dtype.itemsize:,} bytes, the column holds {end - pos:,}")
    return np.frombuffer(data, dtype, count=count, offset=pos).reshape(shape)


def _decode(data: np.ndarray, begin: int, end: int, column: Column):
    if column.encoding.startswith("ndarray"):
        return _decode_ndarray(data, begin, end, column.encoding)
    if column.encoding == "str":
        try:
            return bytes(data[begin:end]).decode("utf-8")
        except UnicodeDecodeError as error:
            raise _SampleProblem(f"column {column.name} is not UTF-8 ({error})") from None
    if column.encoding in SCALAR_DTYPES:
        return np.frombuffer(data, SCALAR_DTYPES[column.encoding], count=1, offset=begin)[0]
    return None  # a column we do not use (bytes, json, images, ...): skipped


def _sample_columns(data: np.ndarray, begin: int, end: int, columns: list,
                    wanted: tuple) -> dict:
    """Decode the `wanted` columns of the sample stored at bytes [begin, end)."""
    variable = [c for c in columns if c.size is None]
    head = begin + 4 * len(variable)
    if head > end:
        raise _SampleProblem(f"{end - begin} bytes, too few for its {len(variable)} column sizes")
    stored = iter(np.frombuffer(data, "<u4", count=len(variable), offset=begin).tolist())
    sizes = [c.size if c.size is not None else next(stored) for c in columns]
    if head + sum(sizes) != end:
        raise _SampleProblem(f"its columns add up to {4 * len(variable) + sum(sizes):,} bytes, "
                             f"the sample is {end - begin:,}")
    values, pos = {}, head
    for column, size in zip(columns, sizes):
        if column.name in wanted:
            values[column.name] = _decode(data, pos, pos + size, column)
        pos += size
    return values


def read_samples(shard: Shard) -> Iterator[tuple[int, dict]]:
    """(sample number, {input_ids, indices, domain?, length?}) of each sample of `shard`.

    The file is memory-mapped: the arrays are views into it, valid while iterating.
    """
    size = os.path.getsize(shard.path)
    data = np.memmap(shard.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    location = shard.path
    if size < 4:
        raise MDSError(f"{location}: {size} bytes, too short for an MDS shard. {REDOWNLOAD}")
    count = int(np.frombuffer(data, "<u4", count=1)[0])
    if count != shard.samples:
        raise MDSError(f"{location}: holds {count:,} samples, shard {shard.number} of "
                       f"{shard.index_path} says {shard.samples:,}: index.json does not belong to "
                       f"this shard. {REDOWNLOAD}")
    header_end = 4 + 4 * (count + 1)
    if header_end > size:
        raise MDSError(f"{location}: {size:,} bytes, too short for the offsets of its {count:,} "
                       f"samples: the file is truncated. {REDOWNLOAD}")
    offsets = np.frombuffer(data, "<u4", count=count + 1, offset=4).astype(np.int64)
    if not header_end <= offsets[0] <= size:
        raise MDSError(f"{location}: the first sample starts at byte {int(offsets[0]):,}, "
                       f"outside [{header_end:,}, {size:,}]: the shard is damaged. {REDOWNLOAD}")
    _check_shard_config(shard, bytes(data[header_end:int(offsets[0])]))
    if offsets[-1] != size:
        raise MDSError(f"{location}: its samples end at byte {int(offsets[-1]):,}, the file is "
                       f"{size:,} bytes: the shard is damaged. {REDOWNLOAD}")
    backwards = np.flatnonzero(np.diff(offsets) < 0)
    if len(backwards):
        k = int(backwards[0])
        raise MDSError(f"{location}: sample {k}: offsets go back from byte {int(offsets[k]):,} to "
                       f"{int(offsets[k + 1]):,}: the shard is damaged. {REDOWNLOAD}")
    wanted = ("input_ids", "indices", "domain", "length")
    for k in range(count):
        try:
            yield k, _sample_columns(data, int(offsets[k]), int(offsets[k + 1]), shard.columns,
                                     wanted)
        except _SampleProblem as problem:
            raise MDSError(f"{location}: sample {k}: {problem}: the shard is damaged. "
                           f"{REDOWNLOAD}") from None


def _check_shard_config(shard: Shard, config_bytes: bytes) -> None:
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MDSError(f"{shard.path}: its settings are not JSON: the shard is damaged. "
                       f"{REDOWNLOAD}") from None
    if not isinstance(config, dict):
        raise MDSError(f"{shard.path}: its settings are not a JSON object: the shard is damaged. "
                       f"{REDOWNLOAD}")
    stored = [(c.name, c.encoding, c.size) for c in shard.columns]
    found = list(zip(config.get("column_names") or [], config.get("column_encodings") or [],
                     config.get("column_sizes") or []))
    if found != stored:
        raise MDSError(f"{shard.path}: holds columns {found}, but shard {shard.number} of "
                       f"{shard.index_path} lists {stored}: index.json does not belong to this "
                       f"shard. {REDOWNLOAD}")


def _document_ranges(values: dict, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 of a sample's document ranges, after checking the sample.

    Raises _SampleProblem for tokens outside the vocabulary or ranges outside the sample,
    reversed or overlapping, and for a `length` that is not the token count.
    """
    ids, ranges = values["input_ids"], values["indices"]
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise _SampleProblem(f"input_ids is {ids.dtype.name} of shape {ids.shape}, not a 1-D "
                             f"integer array")
    if ranges.ndim != 2 or ranges.shape[1] != 2 or ranges.dtype.kind not in "iu":
        raise _SampleProblem(f"indices is {ranges.dtype.name} of shape {ranges.shape}, not "
                             f"[documents, 2] integer [start, end) pairs")
    if len(ids):
        outside = (ids >= vocab_size) | (ids < 0) if ids.dtype.kind == "i" else ids >= vocab_size
        if outside.any():
            at = int(np.argmax(outside))
            raise _SampleProblem(f"input_ids[{at}] is {int(ids[at])}, outside the vocabulary of "
                                 f"{vocab_size:,} ids")
    length = values.get("length")
    if length is not None and isinstance(length, np.integer) and int(length) != len(ids):
        raise _SampleProblem(f"length is {int(length)} but input_ids holds {len(ids)} tokens")
    starts = ranges[:, 0].astype(np.int64)
    ends = ranges[:, 1].astype(np.int64)
    bad = np.flatnonzero((starts < 0) | (starts > ends) | (ends > len(ids)))
    if len(bad):
        j = int(bad[0])
        raise _SampleProblem(f"document {j} has the range [{starts[j]}, {ends[j]}), not inside "
                             f"[0, {len(ids)}] with start <= end")
    overlap = np.flatnonzero(starts[1:] < ends[:-1])
    if len(overlap):
        j = int(overlap[0])
        raise _SampleProblem(f"document {j + 1} starts at {starts[j + 1]}, before document {j} "
                             f"ends at {ends[j]}: ranges must be in order and not overlap")
    return starts, ends


def _sample_tokens(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    if len(starts) and np.array_equal(starts[1:], ends[:-1]):  # ranges back to back (ProLong's)
        return ids[starts[0]:ends[-1]]
    return np.concatenate([ids[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
                          or [ids[:0]])


def llama3_description() -> dict:
    """What the summary records as the tokenizer of Llama-3-tokenized data given without one."""
    specials = llama3_special_tokens(LLAMA3_NUM_BPE_RANKS)
    return {"kind": "llama3", "path": None, "vocab_size": LLAMA3_NUM_BPE_RANKS + len(specials),
            "bos_id": specials["<|begin_of_text|>"], "eos_id": specials["<|end_of_text|>"],
            **llama3_vocabulary()}


def import_mds(source: str, output_prefix: str, tokenizer_path: Optional[str] = None,
               progress: bool = True, allow_empty: bool = False) -> dict:
    """Import one source folder of ProLong's data into OUTPUT_PREFIX.bin/.idx; returns the summary.

    One document per [start, end) range of each sample's `indices`, empty ranges skipped;
    tokens outside every range are not imported (ProLong's trainer does not read them either).
    `tokenizer_path` (optional) is recorded for `lce-data inspect` and its vocabulary bounds
    the ids; without it the ids are checked against Llama-3's 128,256. Every index.json and
    shard size is checked before the first shard is read. The summary (documents, tokens,
    parts, shards, samples, seconds, ...) is also written to OUTPUT_PREFIX.summary.json.
    Raises MDSError naming the file (and sample) on bad input; no output is left then.
    """
    start = time.perf_counter()
    check_output_location(output_prefix, "--output-prefix", (".bin", ".idx", SUMMARY_SUFFIX))
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        described, vocab_size = tokenizer.describe(), tokenizer.vocab_size
    else:
        described = llama3_description()
        vocab_size = described["vocab_size"]
    parts = list_parts(source)
    shards = [shard for name, folder in parts for shard in read_index(name, folder)]
    check_shard_files(shards)
    dtype = token_dtype(vocab_size)
    bar = ProgressBar(progress, unit=" sample", total=sum(s.samples for s in shards))
    domains: Counter = Counter()
    counts = Counter()
    fewest_tokens, most_tokens = None, 0  # per sample
    writer = IndexedWriter(output_prefix, dtype)
    staged_summary = None
    try:
        for shard in shards:
            pieces, lengths = [], []
            for k, values in read_samples(shard):
                try:
                    starts, ends = _document_ranges(values, vocab_size)
                except _SampleProblem as problem:
                    raise MDSError(f"{shard.path}: sample {k}: {problem}. The shard is damaged or "
                                   f"not ProLong's Llama-3 data. {REDOWNLOAD}") from None
                sizes = ends - starts
                pieces.append(_sample_tokens(values["input_ids"], starts, ends))
                lengths.append(sizes[sizes > 0])
                counts["empty_ranges"] += int((sizes == 0).sum())
                counts["uncovered_tokens"] += len(values["input_ids"]) - int(sizes.sum())
                counts["samples"] += 1
                n = len(values["input_ids"])
                fewest_tokens = n if fewest_tokens is None else min(fewest_tokens, n)
                most_tokens = max(most_tokens, n)
                domain = values.get("domain")
                domains[domain if isinstance(domain, str) else "(none)"] += 1
            if pieces:
                # One copy, cast on the way (ids were checked against the vocabulary).
                writer.add_documents(np.concatenate(pieces, dtype=dtype, casting="unsafe"),
                                     np.concatenate(lengths))
            bar.update(len(pieces), writer.num_tokens)
        if writer.num_documents == 0 and not allow_empty:
            raise empty_output_error("document", [source], _why_empty(shards, counts))
        seconds = time.perf_counter() - start
        summary = _summary(source, output_prefix, parts, shards, counts, fewest_tokens,
                           most_tokens, domains, described, dtype, writer, seconds)
        # The three files appear together or not at all: the summary is staged first, the old
        # one removed before the new tokens are published (never the new tokens described by
        # the old summary), and the new one renamed in last.
        staged_summary = stage_summary(output_prefix, summary)
        remove_stale_summary(output_prefix)
        writer.finalize()
        publish(staged_summary, summary_path(output_prefix))
    except BaseException:
        writer.abort()
        if staged_summary:
            discard(staged_summary)
        raise
    finally:
        bar.close()
    return summary


def _why_empty(shards: list, counts: Counter) -> str:
    if not shards:
        return "its index.json files list no shards"
    if not counts["samples"]:
        return f"its {len(shards)} shard(s) hold no samples"
    return (f"every [start, end) range of its {counts['samples']:,} samples is empty "
            f"({counts['empty_ranges']:,} empty ranges); check that this is the source you meant")


def _summary(source, output_prefix, parts, shards, counts, fewest_tokens, most_tokens, domains,
             described, dtype, writer, seconds) -> dict:
    return {
        "output": os.path.abspath(output_prefix),
        "source": os.path.abspath(source),
        "format": "mds",
        "parts": [name for name, _ in parts],
        "shards": len(shards),
        "samples": counts["samples"],
        "sample_tokens": {"min": fewest_tokens or 0, "max": most_tokens},
        "columns": {c.name: c.encoding for c in shards[0].columns} if shards else {},
        "domains": dict(domains.most_common(100)),
        "tokenizer": described,
        "dtype": np.dtype(dtype).name,
        "documents": writer.num_documents,
        "tokens": writer.num_tokens,
        "empty_ranges": counts["empty_ranges"],
        "uncovered_tokens": counts["uncovered_tokens"],
        "seconds": round(seconds, 3),
        "tokens_per_second": round(writer.num_tokens / max(seconds, 1e-9), 1),
    }
