"""Launch real multi-process runs (torchrun, gloo) from tests, with a hard time limit.

A hung collective must fail one test, not eat CI: the whole process group is killed at the
deadline and the test fails with the captured output.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from engine.parallel.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def test_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        # Several ranks share 2 cores: one thread each avoids oversubscription.
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    # engine.train run without torchrun binds MASTER_PORT (29500 by default), which another
    # job on the machine may hold.
    env.setdefault("MASTER_PORT", str(free_port()))
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Test modules import it by name; without this pytest would collect it as a test.
test_env.__test__ = False


def run_command(cmd: list[str], timeout: float, env: dict | None = None,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the group and fail at ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or test_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{output[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, None)


def torchrun(module: str, nproc: int, args: list[str], timeout: float = 300,
             check: bool = True, **env) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m module args`` on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", module, *args]
    result = run_command(cmd, timeout, test_env(**env))
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {' '.join(cmd)}\n{result.stdout[-6000:]}")
    return result
