"""Building the mixture index for 1e9 tokens at L = 524,288: seconds and peak memory.

    python bench/data_tools/bench_mixture_scale.py [--tokens 1e9] [--seq-length 524288]

Synthetic inputs, written cheaply: a real .idx per source (random document lengths) and a
sparse .bin of the right size (no token is written). Half the tokens are a long source
(documents of 64K-4M tokens, split into L pieces), half a short one (documents of ~1K tokens
on average, concatenated). Peak RSS is resource.getrusage's ru_maxrss for this process.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from data_tools.indexed import write_index  # noqa: E402
from data_tools.mixture import build_mixture, load_recipe  # noqa: E402
from data_tools.packed import PackedDataset  # noqa: E402
from data_tools.summary import write_summary  # noqa: E402


def synthetic_source(prefix, lengths):
    write_index(prefix + ".idx", np.int32, lengths)
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 4)  # sparse: takes no disk and no time
    # The largest id (all tokens are 0), as `lce-data preprocess` records it: without it, mix
    # would read the whole .bin to find it, which is not what this measures.
    write_summary(prefix, {"tokenizer": None, "max_token_id": 0})


def lengths_summing_to(rng, total, draw):
    lengths = []
    remaining = total
    while remaining > 0:
        batch = np.minimum(draw(rng, 1 + remaining // 1000), 2 ** 31 - 1).astype(np.int64)
        batch = batch[np.cumsum(batch) <= remaining] if batch.sum() > remaining else batch
        if len(batch) == 0:
            batch = np.array([remaining])
        lengths.append(batch)
        remaining -= int(batch.sum())
    return np.concatenate(lengths).astype(np.int32)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=524288)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench_mixture_")
    rng = np.random.default_rng(0)
    half = int(args.tokens) // 2
    long_lengths = lengths_summing_to(rng, half, lambda r, n: r.integers(65536, 4 << 20, n))
    short_lengths = lengths_summing_to(
        rng, half, lambda r, n: np.maximum(r.lognormal(6.5, 1.0, n), 16))
    synthetic_source(os.path.join(folder, "long"), long_lengths)
    synthetic_source(os.path.join(folder, "short"), short_lengths)
    recipe_path = os.path.join(folder, "recipe.yaml")
    with open(recipe_path, "w") as f:
        f.write(f"name: scale\nseq_length: {args.seq_length}\nseed: 0\nsources:\n"
                f"  - {{name: long, path: long, weight: 0.6, long: true}}\n"
                f"  - {{name: short, path: short, weight: 0.4}}\n")
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    metadata = build_mixture(load_recipe(recipe_path, data_root=folder),
                             os.path.join(folder, "packed"), log=lambda *_: None)
    seconds = time.perf_counter() - start
    rss_after = peak_rss_mb()
    start = time.perf_counter()
    reused = build_mixture(load_recipe(recipe_path, data_root=folder),
                           os.path.join(folder, "packed"), log=lambda *_: None)["reused"]
    cached_seconds = time.perf_counter() - start
    ds = PackedDataset(os.path.join(folder, "packed"))
    picks = rng.integers(0, len(ds), 50)
    start = time.perf_counter()
    for i in picks:
        ds.get(int(i), 0, 4096)
    window_ms = (time.perf_counter() - start) / len(picks) * 1e3
    print(f"input: {int(args.tokens):,} tokens in {len(long_lengths):,} long + "
          f"{len(short_lengths):,} short documents; L = {args.seq_length:,}")
    print(f"build: {seconds:.2f} s, {metadata['num_sequences']:,} sequences; peak RSS "
          f"{rss_before:.0f} MB before -> {rss_after:.0f} MB after; cached rebuild: "
          f"{cached_seconds:.3f} s (reused={reused}); 4K-token window read: {window_ms:.2f} ms")


if __name__ == "__main__":
    main()
