"""merge, stats and inspect: looking at and combining indexed and packed datasets."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from data_tools.indexed import IndexedReader, IndexedWriter
from data_tools.outputs import OutputError, check_output_location
from data_tools.packed_dataset import METADATA_FILE, PackedDataset
from data_tools.summary import (DatasetTokens, MixedTokenizersError, check_one_tokenizer,
                                describe_tokenizer, remove_stale_summary,
                                tokenizer_difference, write_summary)
from data_tools.tokenizer import load_tokenizer


def merge_datasets(inputs: Sequence[str], output_prefix: str) -> dict:
    """Concatenate indexed datasets of one tokenizer, in the order given, into OUTPUT_PREFIX;
    returns the summary also written to OUTPUT_PREFIX.summary.json.

    Raises, before writing anything: OutputError when the output is one of the inputs or
    cannot be written, MixedTokenizersError for inputs of different token dtypes or (where
    their summaries record it) tokenizers.
    """
    suffixes = (".bin", ".idx", ".summary.json")
    check_output_location(output_prefix, "--output-prefix", suffixes)
    output_files = {os.path.realpath(output_prefix + s) for s in (".bin", ".idx")}
    for prefix in inputs:
        if output_files & {os.path.realpath(prefix + s) for s in (".bin", ".idx")}:
            raise OutputError(f"--output-prefix {output_prefix} is the input {prefix}: merging "
                              f"a dataset into itself would replace it while it is read; "
                              f"choose a new --output-prefix")
    readers = [IndexedReader(p) for p in inputs]
    datasets = [DatasetTokens.of(p, f"input {n}", r)
                for n, (p, r) in enumerate(zip(inputs, readers), start=1)]
    tokenizer = check_one_tokenizer(datasets, "Merge")
    writer = IndexedWriter(output_prefix, readers[0].dtype)
    try:
        for reader in readers:
            writer.copy_from(reader)
        remove_stale_summary(output_prefix)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    summary = {"output": os.path.abspath(output_prefix),
               "inputs": [os.path.abspath(p) for p in inputs],
               "tokenizer": tokenizer, "dtype": np.dtype(readers[0].dtype).name,
               "documents": writer.num_documents, "tokens": writer.num_tokens,
               "max_token_id": writer.max_token_id}
    write_summary(output_prefix, summary)
    return summary


def length_histogram(lengths: np.ndarray) -> list[dict]:
    """Documents and tokens per power-of-two length bin [2^k, 2^(k+1)), empty bins left out."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    total = max(int(lengths.sum()), 1)
    rows = []
    for k in np.unique(bins):
        inside = bins == k
        tokens = int(lengths[inside].sum())
        rows.append({"from": int(2 ** k), "to": int(2 ** (k + 1)), "documents": int(inside.sum()),
                     "tokens": tokens, "token_share": tokens / total})
    return rows


def dataset_stats(prefix: str) -> dict:
    """Token counts and the document-length distribution of an indexed dataset (in tokens)."""
    reader = IndexedReader(prefix)
    lengths = np.asarray(reader.lengths, dtype=np.int64)
    empty = len(lengths) == 0
    return {
        "prefix": os.path.abspath(prefix), "dtype": np.dtype(reader.dtype).name,
        "documents": int(len(lengths)), "tokens": int(lengths.sum()),
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "min": 0 if empty else int(lengths.min()),
        "mean": 0.0 if empty else round(float(lengths.mean()), 1),
        "median": 0 if empty else int(np.median(lengths)),
        "p90": 0 if empty else int(np.percentile(lengths, 90)),
        "max": 0 if empty else int(lengths.max()),
        "histogram": length_histogram(lengths),
    }


def format_stats(stats: dict) -> str:
    lines = [f"{stats['prefix']}: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
             f"({stats['dtype']}, {stats['bin_bytes']:,} bytes)",
             f"document length (tokens): min {stats['min']:,}  median {stats['median']:,}  "
             f"mean {stats['mean']:,}  p90 {stats['p90']:,}  max {stats['max']:,}",
             "", f"{'length (tokens)':>24} {'documents':>10} {'tokens':>14} {'% tokens':>9}"]
    for row in stats["histogram"]:
        span = f"[{row['from']:,}, {row['to']:,})"
        lines.append(f"{span:>24} {row['documents']:>10,} {row['tokens']:>14,} "
                     f"{100 * row['token_share']:>8.1f}%")
    return "\n".join(lines)


def plot_histogram(stats: dict, png_path: str) -> None:
    """Bar chart of documents and token share per length bin, written to `png_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stats["histogram"]
    labels = [f"2^{int(np.log2(r['from']))}" for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.bar(labels, [r["documents"] for r in rows], color="tab:blue")
    top.set_ylabel("documents")
    top.set_title(f"{os.path.basename(stats['prefix'])}: {stats['documents']:,} documents, "
                  f"{stats['tokens']:,} tokens")
    bottom.bar(labels, [100 * r["token_share"] for r in rows], color="tab:orange")
    bottom.set_ylabel("% of tokens")
    bottom.set_xlabel("document length (tokens), bin start")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def recorded_tokenizer(path: str) -> Optional[dict]:
    """The tokenizer record (TextTokenizer.describe()) of `path` (a prefix or a packed folder),
    from its summary or its first source's; None if none is recorded."""
    candidates = [path + ".summary.json", os.path.join(path, METADATA_FILE)]
    for candidate in candidates:
        if os.path.exists(candidate):
            with open(candidate) as f:
                data = json.load(f)
            if data.get("tokenizer"):
                return data["tokenizer"]
            for source in data.get("sources", []):
                found = recorded_tokenizer(source["prefix"])
                if found:
                    return found
    return None


def tokenizer_of(path: str) -> Optional[str]:
    """The tokenizer path recorded when `path` (a prefix or a packed folder) was built."""
    record = recorded_tokenizer(path)
    return record.get("path") if record else None


def _decoder(path: str, tokenizer_path: Optional[str]):
    """The tokenizer to decode `path`'s ids with (``tokenizer_path``, else the recorded one),
    None if there is none; raises MixedTokenizersError if it is not the one the data was built
    with (its ids would decode as other tokens)."""
    record = recorded_tokenizer(path)
    tokenizer_path = tokenizer_path or (record.get("path") if record else None)
    if not tokenizer_path:
        return None
    tokenizer = load_tokenizer(tokenizer_path)
    difference = record and tokenizer_difference(tokenizer.describe(), record)
    if difference:
        raise MixedTokenizersError(
            f"tokenizer {tokenizer_path} is {describe_tokenizer(tokenizer.describe())}, but "
            f"{path} was built with {describe_tokenizer(record)} ({difference}): its ids would "
            f"decode as other tokens; pass the data's own tokenizer with --tokenizer")
    return tokenizer


def _check_number(index: int, count: int, what: str, where: str) -> None:
    if not 0 <= index < count:
        held = f"{count:,} {what}s, numbered 0 to {count - 1:,}" if count else f"no {what}s"
        raise ValueError(f"{what} {index}: {where} holds {held}; give a {what} number in that "
                         f"range" if count else f"{what} {index}: {where} holds {held}, there "
                         f"is nothing to inspect")


def inspect_document(prefix: str, index: int, tokenizer_path: Optional[str] = None) -> dict:
    """Document `index` of an indexed dataset: its length, first ids and decoded text."""
    reader = IndexedReader(prefix)
    _check_number(index, len(reader), "document", f"the dataset {prefix}")
    tokens = np.asarray(reader[index])
    result = {"document": index, "tokens": int(len(tokens)), "ids": tokens[:16].tolist()}
    tokenizer = _decoder(prefix, tokenizer_path)
    if tokenizer:
        result["text"] = tokenizer.decode(tokens)
    return result


def inspect_sequence(folder: str, index: int, tokenizer_path: Optional[str] = None) -> dict:
    """Packed sequence `index`: source, document lengths, loss tokens and decoded pieces."""
    dataset = PackedDataset(folder)
    _check_number(index, len(dataset), "sequence", f"the packed dataset {folder}")
    sequence = dataset[index]
    result = {"sequence": index, "source": dataset.source_of(index),
              "tokens": int(len(sequence.tokens)),
              "doc_lengths": sequence.doc_lengths.tolist(),
              "loss_tokens": (int(sequence.loss_mask.sum()) if sequence.loss_mask is not None
                              else int(len(sequence.tokens)))}
    tokenizer = _decoder(folder, tokenizer_path)
    if tokenizer:
        ends = np.cumsum(sequence.doc_lengths)
        result["pieces"] = [tokenizer.decode(sequence.tokens[end - n:end])
                            for n, end in zip(sequence.doc_lengths.tolist(), ends.tolist())]
    return result
