"""Parameters brought up to date between training steps, when their all-gather overlaps the
forward.

With the distributed optimizer each data-parallel rank updates only its shard of the weights;
the updated shards are all-gathered into every rank's full parameters. On a GPU the engine
overlaps that all-gather with the next forward (megatron-core's ``overlap_param_gather``, as
Megatron-LM's recipes run): each module's forward pre-hook waits for the buckets it needs. Until
that forward, the full parameters hold the previous step's values. Anything that reads them
between steps (a checkpoint save, an evaluation, a weight dump) runs inside
``parameters_current``, which removes the hooks, gathers every bucket now and puts the hooks
back afterwards (Megatron-LM disables its forward pre-hooks around saves and evaluation the same
way).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence


def _gathers_in_forward(chunk) -> bool:
    """Whether ``chunk`` (megatron's DistributedDataParallel) has its param all-gather hooks on."""
    return bool(getattr(chunk, "use_forward_hook", False)
                and getattr(chunk, "remove_forward_pre_hook_handles", None))


@contextmanager
def parameters_current(chunks: Sequence) -> Iterator[None]:
    """Inside, every chunk's full parameters hold the last optimizer step's values. A no-op for
    chunks whose parameters are gathered in the optimizer step (no overlap, or no distributed
    optimizer) and when already inside (nested use)."""
    hooked = [chunk for chunk in chunks if _gathers_in_forward(chunk)]
    for chunk in hooked:
        # Waits for an all-gather already in flight, else gathers every bucket synchronously.
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
