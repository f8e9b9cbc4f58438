"""Kernel tests run the Triton kernels through Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when a csrc/*/triton_kernels.py module
is first imported; csrc imports those lazily, so setting it here, at collection, is early enough.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

