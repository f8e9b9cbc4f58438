"""Fixtures for the engine tests: a small packed dataset of a tiny vocabulary, the real
Llama-3 tokenizer."""
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.indexed import IndexedWriter
from data_tools.tokenizer import load_tokenizer
from tests.engine.evaluate_helpers import llama3_tokenizer_dir
from tests.distributed import REPO

TRAIN_TEST_CONFIG = """
model: {name: tiny, overrides: {num_layers: 2}}
data: {global_batch: 4, micro_batch: 1}
optimizer: {lr: 1.0e-3, warmup_fraction: 0.0}
logging: {tensorboard: false}
collective_timeout_s: 60
"""


@pytest.fixture(scope="session")
def packed_tiny_dataset(tmp_path_factory) -> str:
    """A 64-token packed long/short mixture over token ids < 512 (the tiny model's vocab)."""
    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    for name, lengths in (("long", rng.integers(64, 300, 12)), ("short", rng.integers(3, 40, 200))):
        with IndexedWriter(str(root / name)) as writer:
            writer.add_documents(rng.integers(0, 512, int(lengths.sum())).astype(np.int32),
                                 lengths.astype(np.int64))
    recipe = root / "recipe.yaml"
    recipe.write_text("name: tiny\nseq_length: 64\nseed: 1\nsources:\n"
                      "  - {name: long, path: long, weight: 0.6, long: true}\n"
                      "  - {name: short, path: short, weight: 0.4}\n")
    out = root / "packed"
    subprocess.run([sys.executable, "-m", "data_tools", "mix", str(recipe), "--output", str(out),
                    "--data-root", str(root)], check=True, cwd=REPO, capture_output=True)
    return str(out)


@pytest.fixture
def train_config(tmp_path) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN_TEST_CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def llama3():
    """Llama-3's BPE rank file (tokenizer.model), the engine's own tokenizer kind."""
    return load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"))
