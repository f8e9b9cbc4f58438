"""Process groups for a ParallelLayout: the one place the engine initializes distribution."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from engine.megatron_compat import enable_cpu_support
from engine.parallel.layout import LayoutError, ParallelLayout


def initialize_parallel(layout: ParallelLayout, *, seed: int = 1234,
                        timeout_s: float = 600.0) -> None:
    """Build every process group of ``layout`` (already validated against the model: the run
    plan did that) and seed megatron's model-parallel RNG.

    Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them. Uses NCCL on GPU,
    and gloo plus megatron-core CPU support (engine.megatron_compat) without one.
    ``timeout_s`` bounds every collective, so a dead rank fails its peers instead of hanging them.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != layout.world_size:  # the one check that needs the launcher's environment
        raise LayoutError(
            f"{world_size} processes were launched for the layout {layout.describe()}, which "
            f"needs {layout.world_size}: launch {layout.world_size} or change the layout")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_support()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        **layout.megatron_sizes(),
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
