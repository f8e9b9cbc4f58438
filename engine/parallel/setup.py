"""Process groups for a ParallelLayout: the one place the engine initializes distribution."""
from __future__ import annotations

import errno
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from engine.megatron_compat import enable_cpu_support
from engine.parallel.layout import LayoutError, ParallelLayout
from engine.parallel.ports import free_port


DEFAULT_MASTER_PORT = 29500


class LaunchError(RuntimeError):
    """A launch environment the process group cannot start in (the message names the fix)."""


def check_rendezvous_port() -> None:
    """Before any process group: the port rank 0 will listen on is free, or a LaunchError
    naming it and the fix (else init_process_group fails with a DistNetworkError traceback).

    Under torchrun the launcher already holds the port and the workers only connect: nothing
    to check. A single process started without torchrun and without MASTER_PORT gets a free
    port of its own, as no other process needs to find it. A MASTER_ADDR of another host is
    that host's business."""
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("RANK", "0") != "0":
        return
    if os.environ.get("MASTER_ADDR", "localhost") not in (
            "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()):
        return
    text = os.environ.get("MASTER_PORT")
    if text is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        os.environ["MASTER_PORT"] = str(free_port())
        return
    text = text or str(DEFAULT_MASTER_PORT)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise LaunchError(f"MASTER_PORT {text!r} is not a port number: set it to a free port "
                          f"in 1..65535")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", int(text)))
        except OSError as error:
            why = ("another process is listening on it" if error.errno == errno.EADDRINUSE
                   else error.strerror or str(error))
            raise LaunchError(f"MASTER_PORT {text} cannot be used ({why}): set MASTER_PORT to a "
                              f"free port, or stop the process holding it (e.g. a previous run "
                              f"still ending)") from None


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
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
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
