"""Corpus files -> Megatron indexed dataset (PREFIX.bin/.idx) with a JSON summary beside it.

Pipeline: the main process reads raw chunks of records (a few MB each); workers parse JSON and
tokenize a whole chunk per call, returning flat numpy arrays (cheap to pickle); the main process
adds BOS/EOS, filters short documents and writes the arrays in bulk. Per-record work in Python is
only the JSON parse, which is why this beats one-pool-task-per-line preprocessing.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from data_tools.indexed import IndexedReader, IndexedWriter, token_dtype
from data_tools.inputs import (CHUNK_BYTES, BadRecord, InputError, RawChunk, list_input_files,
                               parse_chunk, read_chunks, text_file_groups)
from data_tools.outputs import (NO_RECORDS_REASON, all_skipped_reason, check_output_location,
                               empty_output_error)
from data_tools.summary import remove_stale_summary, write_summary
from data_tools.tokenizer import load_tokenizer

MAX_BAD_RECORDS_KEPT = 100


@dataclass
class PreprocessOptions:
    json_keys: Sequence[str] = ("text",)
    group_by: Optional[str] = None
    append_eos: bool = True
    prepend_bos: bool = False
    min_tokens: int = 0
    workers: int = 1
    skip_bad: bool = False
    progress: bool = True
    allow_empty: bool = False


def usable_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def max_workers() -> int:
    """The most tokenizer processes preprocess accepts: 2 per usable core. Tokenizing is
    CPU-bound, so more only cost memory (each worker holds a tokenizer and chunks of text)."""
    return 2 * usable_cpu_cores()


def check_options(options: PreprocessOptions) -> None:
    """Raise ValueError naming the option, its value and the fix for an option out of range."""
    for name, value in (("--workers", options.workers), ("--min-tokens", options.min_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} {value!r}: give a whole number")
    if options.workers < 1:
        raise ValueError(f"--workers {options.workers}: give at least 1 (the number of "
                         f"tokenizer processes)")
    if options.workers > max_workers():
        raise ValueError(f"--workers {options.workers} is far above the "
                         f"{usable_cpu_cores()} CPU cores this process may use; tokenizing is "
                         f"CPU-bound, so give at most {max_workers()} (2 per core), e.g. "
                         f"--workers {usable_cpu_cores()} (one per core)")
    if options.min_tokens < 0:
        raise ValueError(f"--min-tokens {options.min_tokens}: a document length cannot be "
                         f"negative; give 0 (keep every document) or more")


@dataclass
class ChunkTokens:
    """One chunk, tokenized: ids back to back, per-document lengths, group keys, problems."""
    tokens: np.ndarray
    lengths: np.ndarray
    groups: Optional[list]
    bad: list
    records: int


@dataclass
class Counters:
    documents: int = 0
    tokens: int = 0
    records: int = 0
    skipped_lines: int = 0
    filtered_documents: int = 0
    filtered_tokens: int = 0
    bad_records: list = field(default_factory=list)


_worker: dict = {}


def _init_worker(tokenizer_path: str, json_keys, group_by, dtype, bos, eos) -> None:
    # One core per worker: the Rust encoders would otherwise start a thread per core each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A forked worker inherits the parent's loaded tokenizer (loading Llama-3's takes 0.1-0.5 s).
    if _worker.get("tokenizer_path") != tokenizer_path:
        _worker.update(tokenizer=load_tokenizer(tokenizer_path), tokenizer_path=tokenizer_path)
    _worker.update(json_keys=json_keys, group_by=group_by, dtype=dtype, bos=bos, eos=eos)


def _tokenize_chunk(chunk: RawChunk) -> ChunkTokens:
    lines: list[int] = []
    texts, groups, bad = parse_chunk(chunk, _worker["json_keys"], _worker["group_by"], lines)
    try:
        tokens, lengths = _worker["tokenizer"].encode_batch_flat(texts, dtype=_worker["dtype"])
    except BaseException as error:  # Rust encoders panic with pyo3's BaseException subclass
        if not _is_encoder_failure(error):
            raise
        tokens, lengths, groups = _encode_one_by_one(chunk, texts, groups, lines, bad)
    if groups is None:
        # Whole documents: BOS/EOS go in here, off the main process (which every worker waits on).
        # Grouped pieces get theirs once the groups are assembled.
        tokens, lengths = add_boundary_tokens(tokens, lengths, _worker["bos"], _worker["eos"])
    return ChunkTokens(tokens, lengths, groups, bad, chunk.num_records)


def _is_encoder_failure(error: BaseException) -> bool:
    return not isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _encode_one_by_one(chunk: RawChunk, texts, groups, lines, bad):
    """A chunk the encoder failed on, one document at a time: each document it fails on becomes
    a bad record (file, line, the encoder's error); the others are returned in order as
    (tokens, lengths, groups)."""
    tokenizer, dtype = _worker["tokenizer"], _worker["dtype"]
    parts, kept_groups = [], None if groups is None else []
    for i, text in enumerate(texts):
        try:
            parts.append(tokenizer.encode_batch_flat([text], dtype=dtype)[0])
        except BaseException as error:
            if not _is_encoder_failure(error):
                raise
            message = str(error).splitlines()[0][:200] if str(error) else ""
            encoder = getattr(tokenizer, "encoder", tokenizer.kind)
            bad.append(BadRecord(
                chunk.path, lines[i], f"the {encoder} encoder failed on this document "
                                      f"({type(error).__name__}: {message}; {len(text):,} characters)",
                "pass --skip-bad to skip it" + (", or encode with splintr (pip install splintr-rs; "
                                                "LCE_BPE_ENCODER unset)"
                                                if encoder == "tiktoken" else "")))
            continue
        if kept_groups is not None:
            kept_groups.append(groups[i])
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, lengths, kept_groups


def add_boundary_tokens(tokens: np.ndarray, lengths: np.ndarray, bos: Optional[int],
                        eos: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Insert `bos` before and `eos` after each document of a flat array; returns new arrays."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if eos is not None:
        tokens = np.insert(tokens, np.cumsum(lengths), eos)
        lengths = lengths + 1
    if bos is not None:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tokens = np.insert(tokens, starts, bos)
        lengths = lengths + 1
    return tokens, lengths


def _keep_long_enough(tokens, lengths, min_tokens, counters: Counters):
    if min_tokens <= 0:
        return tokens, lengths
    keep = lengths >= min_tokens
    counters.filtered_documents += int((~keep).sum())
    counters.filtered_tokens += int(lengths[~keep].sum())
    return tokens[np.repeat(keep, lengths)], lengths[keep]


class ProgressBar:
    """tqdm bar counting items (documents by default), with tokens/s beside the items/s.

    `total` (items) gives the bar an end and an ETA; None counts without one.
    """

    def __init__(self, enabled: bool, unit: str = " doc", total: Optional[int] = None):
        self.bar = None
        self.start = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=unit, unit_scale=True, total=total, mininterval=1.0,
                            dynamic_ncols=True)

    def update(self, items: int, total_tokens: int) -> None:
        if self.bar is not None:
            rate = total_tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{total_tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
            self.bar.update(items)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tokenized_chunks(files: list[str], file_groups: dict, tokenizer_path: str,
                      options: PreprocessOptions, dtype, bos, eos) -> Iterator[ChunkTokens]:
    columns = list(options.json_keys) + ([options.group_by] if options.group_by else [])
    # Smaller chunks with several workers, so that a few-MB input still keeps all of them busy.
    chunk_bytes = CHUNK_BYTES if options.workers <= 1 else CHUNK_BYTES // 4
    raw = (chunk for path in files
           for chunk in read_chunks(path, columns, chunk_bytes, file_groups.get(path)))
    init_args = (tokenizer_path, tuple(options.json_keys), options.group_by, dtype, bos, eos)
    _init_worker(*init_args)
    if options.workers <= 1:
        yield from map(_tokenize_chunk, raw)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(options.workers, initializer=_init_worker, initargs=init_args) as pool:
        # imap keeps input order, so documents land in the .bin in corpus order.
        yield from pool.imap(_tokenize_chunk, raw, chunksize=1)


def _absorb_problems(result: ChunkTokens, options: PreprocessOptions, counters: Counters) -> None:
    for record in result.bad:
        if not options.skip_bad:
            raise InputError(record)
        counters.skipped_lines += 1
        if len(counters.bad_records) < MAX_BAD_RECORDS_KEPT:
            counters.bad_records.append(record.as_dict())


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_path: str,
               options: Optional[PreprocessOptions] = None) -> dict:
    """Tokenize `inputs` (files or folders) into OUTPUT_PREFIX.bin/.idx; returns the summary.

    The summary (documents, tokens, the largest token id, the tokenizer, skipped lines,
    seconds, ...) is also written to OUTPUT_PREFIX.summary.json. Raises, before writing
    anything: ValueError for an option out of range, OutputError for an output prefix that
    cannot be written, InputError on the first bad record unless skip_bad, EmptyOutputError
    when no document is left unless allow_empty.
    """
    options = options or PreprocessOptions()
    check_options(options)
    check_output_location(output_prefix, "--output-prefix", (".bin", ".idx", ".summary.json"))
    start = time.perf_counter()
    files = list_input_files(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    _worker.update(tokenizer=tokenizer, tokenizer_path=tokenizer.path)
    bos = tokenizer.bos_id if options.prepend_bos else None
    eos = tokenizer.eos_id if options.append_eos else None
    if options.append_eos and eos is None:
        raise ValueError(f"tokenizer {tokenizer_path} defines no EOS token; drop --append-eos")
    if options.prepend_bos and bos is None:
        raise ValueError(f"tokenizer {tokenizer_path} defines no BOS token; drop --prepend-bos")
    dtype = token_dtype(tokenizer.vocab_size)
    counters = Counters()
    progress = ProgressBar(options.progress)
    # Grouped documents are assembled after all input is read, from pieces kept on disk.
    writer = IndexedWriter(output_prefix + (".pieces" if options.group_by else ""), dtype)
    group_ids: dict[str, int] = {}
    piece_groups: list[np.ndarray] = []
    try:
        file_groups = text_file_groups(inputs, files) if options.group_by else {}
        for result in _tokenized_chunks(files, file_groups, tokenizer.path, options, dtype, bos,
                                        eos):
            _absorb_problems(result, options, counters)
            counters.records += result.records
            tokens, lengths = result.tokens, result.lengths
            if options.group_by:
                piece_groups.append(np.fromiter(
                    (group_ids.setdefault(g, len(group_ids)) for g in result.groups),
                    dtype=np.int64, count=len(result.groups)))
            else:
                tokens, lengths = _keep_long_enough(tokens, lengths, options.min_tokens, counters)
                counters.documents += len(lengths)
            writer.add_documents(tokens, lengths)
            counters.tokens += len(tokens)
            progress.update(len(result.lengths), counters.tokens)
        if writer.num_documents == 0:
            _refuse_empty(files, counters, options)
        if not options.group_by:
            remove_stale_summary(output_prefix)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    max_token_id = writer.max_token_id
    if options.group_by:
        gids = np.concatenate(piece_groups) if piece_groups else np.zeros(0, np.int64)
        max_token_id = _assemble_groups(output_prefix, gids, bos, eos, dtype, counters, options,
                                        files)
    seconds = time.perf_counter() - start
    summary = {
        "output": os.path.abspath(output_prefix),
        "inputs": [os.path.abspath(p) for p in files],
        "tokenizer": tokenizer.describe(),
        "dtype": np.dtype(dtype).name,
        "documents": counters.documents,
        "tokens": counters.tokens,
        "max_token_id": max_token_id,
        "input_records": counters.records,
        "skipped_lines": counters.skipped_lines,
        "bad_records": counters.bad_records,
        "filtered_documents": counters.filtered_documents,
        "filtered_tokens": counters.filtered_tokens,
        "groups": len(group_ids) if options.group_by else None,
        "json_keys": list(options.json_keys),
        "group_by": options.group_by,
        "append_eos": options.append_eos,
        "prepend_bos": options.prepend_bos,
        "min_tokens": options.min_tokens,
        "workers": options.workers,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(counters.tokens / max(seconds, 1e-9), 1),
    }
    write_summary(output_prefix, summary)
    return summary


def _refuse_empty(files: Sequence[str], counters: Counters, options: PreprocessOptions) -> None:
    """Raise EmptyOutputError saying why no document is left, unless --allow-empty."""
    if options.allow_empty:
        return
    if counters.filtered_documents:
        why = (f"all documents ({counters.filtered_documents:,}) are shorter than --min-tokens "
               f"{options.min_tokens}; lower --min-tokens")
    elif counters.skipped_lines:
        why = all_skipped_reason(counters.skipped_lines, counters.bad_records[0])
    else:
        why = NO_RECORDS_REASON
    raise empty_output_error("document", files, why)


def _assemble_groups(output_prefix: str, piece_groups: np.ndarray, bos, eos, dtype,
                     counters: Counters, options: PreprocessOptions, files: Sequence[str],
                     flush_tokens: int = 1 << 24) -> Optional[int]:
    """Concatenate the pieces of each group, in input order, into one document per group;
    returns the largest token id written (None if none)."""
    min_tokens = options.min_tokens
    pieces = IndexedReader(output_prefix + ".pieces")
    order = np.argsort(piece_groups, kind="stable")
    group_sizes = np.bincount(piece_groups, weights=pieces.lengths, minlength=0).astype(np.int64)
    group_sizes += (bos is not None) + (eos is not None)
    group_starts = np.searchsorted(piece_groups[order], np.arange(len(group_sizes)))
    group_starts = np.append(group_starts, len(order))
    counters.tokens = 0
    writer = IndexedWriter(output_prefix, dtype)
    try:
        parts, lengths, buffered = [], [], 0
        for group, size in enumerate(group_sizes):
            if size < min_tokens:
                counters.filtered_documents += 1
                counters.filtered_tokens += int(size)
                continue
            if bos is not None:
                parts.append(np.array([bos], dtype=dtype))
            parts.extend(pieces[p] for p in order[group_starts[group]:group_starts[group + 1]])
            if eos is not None:
                parts.append(np.array([eos], dtype=dtype))
            lengths.append(size)
            buffered += size
            if buffered >= flush_tokens:
                writer.add_documents(np.concatenate(parts), np.array(lengths))
                parts, lengths, buffered = [], [], 0
        if lengths:
            writer.add_documents(np.concatenate(parts), np.array(lengths))
        counters.documents = writer.num_documents
        counters.tokens = writer.num_tokens
        if writer.num_documents == 0:
            _refuse_empty(files, counters, options)
        remove_stale_summary(output_prefix)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        del pieces
        for suffix in (".bin", ".idx"):
            os.remove(output_prefix + ".pieces" + suffix)
    return writer.max_token_id
