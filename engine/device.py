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


def to_accelerator(tensor: torch.Tensor, keep_host_copy: bool = False) -> torch.Tensor:
    """``tensor`` on the accelerator; a non-blocking copy from pinned host memory on a GPU, the
    tensor itself on the host.

    ``keep_host_copy``: the copy remembers ``tensor`` for ``host_copy``, for small index tensors
    (document boundaries) whose values host code reads: reading them back from the GPU would
    wait for the stream, and a dry run's device holds no values at all.
    """
    return copy_to(tensor, accelerator(), keep_host_copy)


def copy_to(tensor: torch.Tensor, device: torch.device,
            keep_host_copy: bool = False) -> torch.Tensor:
    """``tensor`` on ``device`` (itself if it is there), as to_accelerator."""
    if tensor.device == device:
        return tensor
    moved = tensor.to(device, non_blocking=True)
    if keep_host_copy and tensor.device.type == "cpu":
        moved._host_copy = tensor
    return moved


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values on the host: the host tensor it was copied from (to_accelerator with
    ``keep_host_copy``) when there is one, else a copy back."""
    source = getattr(tensor, "_host_copy", None)
    return source if source is not None else tensor.cpu()


def module_to_accelerator(module: torch.nn.Module) -> torch.nn.Module:
    """Move ``module``'s parameters and buffers to the accelerator, in place (Megatron-LM's
    ``model.cuda(current_device)``), and return it; nothing changes on the host.

    Parameters keep the attributes megatron sets on them (tensor-parallel marks, ``shared``,
    ``allreduce``) and stay shared where they were (tied embeddings): a GPU keeps the Parameter
    objects anyway, but a move to the dry run's ``meta`` device makes new ones, which inherit
    the old ones' attributes here.
    """
    device = accelerator()
    moved: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or param.device == device:
                continue
            if id(param) not in moved:
                if device.type == "meta":
                    new = torch.nn.Parameter(param.data.to(device), param.requires_grad)
                    new.__dict__.update(param.__dict__)
                else:
                    param.data = param.data.to(device)
                    new = param
                moved[id(param)] = new
            sub._parameters[name] = moved[id(param)]
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device != device:
                sub._buffers[name] = buffer.to(device)
    return module


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
