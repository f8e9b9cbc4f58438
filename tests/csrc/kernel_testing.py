"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""
import torch

from engine.parallel.ports import free_port


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Compare in fp64; infinities must match exactly (lse = -inf rows) and nothing may be NaN."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: -inf pattern differs"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run_ranks(worker, world_size: int, *args, timeout_s: float = 180.0) -> None:
    """Run worker(rank, world_size, port, *args) in world_size spawned processes; re-raise failures.

    Every collective inside has its own 60 s timeout (init_process_group(timeout=...)); this outer
    deadline stops a test from hanging if a process dies before reaching one.
    """
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"ranks did not finish within {timeout_s} s")


def init_gloo(rank: int, world_size: int, port: int):
    """Join a gloo group on localhost with a 60 s timeout on every collective."""
    from datetime import timedelta

    # Imported first on purpose: importing torch._dynamo after init_process_group (the first call
    # of a torch.library custom op does) keeps the group alive past destroy_process_group. Its
    # gloo threads then free the last collective's tensors during interpreter shutdown and the
    # rank aborts ("terminate called without an active exception"). The engine imports it early.
    import torch._dynamo  # noqa: F401
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    return dist.group.WORLD
