"""Long-context continued pre-training engine for Llama-3 on megatron-core.

Install on a CPU machine with ``pip install torch==2.13.0 && pip install -e .``:
torch is pinned first so that no dependency pulls the multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="longctx-engine",
    version="0.1.0",
    description="Train Llama-3 to 64K-512K tokens of context (ProLong recipe) on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "data_tools*", "csrc*", "publishing*"]),
    include_package_data=True,
    package_data={"data_tools": ["recipes/*.yaml", "sample/*"], "engine": ["configs/*.yaml"]},
    install_requires=[
        # No upper bound: a GPU image's torch (a newer release, or a pre-release build such as
        # NGC's 2.14.0a0+...) must stay. Versions not in engine.megatron_compat.TESTED_TORCH
        # warn at start-up instead.
        "torch>=2.6",
        # 0.16.1 is the newest for Python 3.11. engine/megatron_compat.py patches megatron's
        # internals by name and was checked on the releases in CHECKED_VERSIONS; a release of the
        # next minor is held back until that file has been checked on it.
        "megatron-core>=0.16.1,<0.20",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "tiktoken>=0.7",
        # Llama-3 BPE encoder for preprocessing: 1.6x (cold) to 6x (warm cache) tiktoken's speed
        # with the same ids (tests/data_tools/test_data_tokenizer.py compares them). Pinned to
        # the minor release those tests ran on; tiktoken takes over if it is missing.
        "splintr-rs>=0.22,<0.23",
        "tokenizers>=0.19",
        "zstandard>=0.22",
        "pyarrow>=14",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        # megatron's checkpoint writer processes need it, and hang the save without it.
        "psutil>=5.9",
        # Version comparisons (engine.megatron_compat's start-up check).
        "packaging>=20",
        # RULER's word lists (its needle keys and cwe's words), read from the package's data.
        "wonderwords>=2.2,<3",
    ],
    extras_require={
        # GPU extras: used when present, never required. flash-attn (>= 2.1) and
        # transformer-engine are not listed: they build against the installed torch, which pip's
        # build isolation hides (their builds fail with "No module named 'torch'"). The README
        # installs them with --no-build-isolation.
        "gpu": ["triton>=3.1"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "transformers>=4.44", "triton>=3.1",
                 "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "lce-data=data_tools.cli:main",
        ],
    },
)
