"""Process groups for a ParallelLayout: the one place the engine initializes distribution."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from engine.model.config import LlamaConfig
from engine.parallel.cpu_support import enable_cpu_support
from engine.parallel.layout import ParallelLayout


def initialize_parallel(layout: ParallelLayout, model: LlamaConfig, *,
                        num_microbatches: Optional[int] = None, seed: int = 1234,
                        timeout_s: float = 600.0) -> None:
    """Validate ``layout`` against the model and world size, then build every process group.

    Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them. Uses NCCL on GPU,
    and gloo plus megatron-core CPU support (engine.parallel.cpu_support) without one.
    ``timeout_s`` bounds every collective, so a dead rank fails its peers instead of hanging them.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Checked before any process group exists.
    layout.validate(model, world_size=world_size, num_microbatches=num_microbatches)

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
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=(
            layout.virtual_stages if layout.virtual_stages > 1 else None),
        context_parallel_size=layout.context_parallel,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
