"""Where the engine computes: the one device decision, used by training, evaluation, the layout
check, the planner's measurement and conversion verify.

On a GPU the model, every batch and every tensor handed to a collective live on the local GPU
(NCCL takes device tensors only), as Megatron-LM's ``get_model`` and ``get_batch`` place them.
Without a GPU the same code runs on the host (gloo). A dry run (``--dry-run``) substitutes the
``meta`` device for the GPU, so that the accelerator branch of every decision below is taken on a
machine without one.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_simulated: Optional[torch.device] = None


def accelerator() -> torch.device:
    """The device this process computes on: the current CUDA device with a GPU, the device a dry
    run simulates (``meta``), else the CPU."""
    if _simulated is not None:
        return _simulated
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_accelerator() -> bool:
    """True when the engine computes off the host (a GPU, or a dry run's simulated device)."""
    return accelerator().type != "cpu"


def to_accelerator(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the accelerator; a non-blocking copy from pinned host memory on a GPU, the
    tensor itself on the host."""
    device = accelerator()
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked host memory when a GPU will read it (so the copy can overlap
    compute), else unchanged."""
    if accelerator().type == "cuda" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


@contextmanager
def simulated_accelerator(device: str | torch.device = "meta") -> Iterator[torch.device]:
    """Within the block, ``accelerator()`` is ``device`` (the dry run's stand-in for a GPU)."""
    global _simulated
    previous, _simulated = _simulated, torch.device(device)
    try:
        yield _simulated
    finally:
        _simulated = previous
