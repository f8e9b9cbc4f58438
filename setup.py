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
    packages=find_packages(include=["engine*", "data_tools*", "csrc*"]),
    include_package_data=True,
    package_data={"data_tools": ["recipes/*.yaml", "sample/*"], "engine": ["configs/*.yaml"]},
    install_requires=[
        # Tested: torch 2.13.0 (CPU, this repo's CI) and 2.11 (H100 machine).
        "torch>=2.6,<2.14",
        # 0.16.1 is the newest for Python 3.11; our CPU shim patches its internals by name.
        "megatron-core>=0.16.1,<0.19",
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
    ],
    extras_require={
        # GPU extras: used when present, never required. flash-attn >= 2.1 aligns the causal
        # mask bottom-right when a document has fewer queries than keys; the all-gather CP
        # attention relies on it (older versions align top-left: wrong attention, no error).
        "gpu": ["flash-attn>=2.1", "transformer-engine[pytorch]", "triton"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "transformers>=4.44", "triton>=3.1",
                 "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "lce-data=data_tools.cli:main",
        ],
    },
)
