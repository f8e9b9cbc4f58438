"""The batch step of examples/train_slurm.sbatch: `python -m engine.recipe.slurm LAUNCH...` runs
the launcher command LAUNCH once on every node of the job under srun, with NNODES, NODE_RANK,
MASTER_ADDR (the first node's address) and MASTER_PORT (one per job) set, after checking the
launch (LAUNCH --check, as node 0) before srun starts anything. A SIGTERM to this process (the
time-limit signal, `--signal=B:TERM@300`, reaches the batch step alone) is passed to every
process of the job step, and the step is waited for to its end."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

NAME = "train_slurm.sbatch"
# A node's address in `scontrol show node NODE -o`.
_NODE_ADDR = re.compile(r"(?:^|\s)NodeAddr=(\S+)")


class SlurmError(RuntimeError):
    """What the batch step cannot go on without (exit code 2)."""


def _scontrol(*args: str) -> str:
    result = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if result.returncode:
        raise SlurmError(f"'scontrol {' '.join(args)}' failed: {result.stderr.strip()}")
    return result.stdout


def master_port(job_id: str, environ) -> str:
    """MASTER_PORT as set, else one per job, so that jobs sharing a first node do not
    collide."""
    return environ.get("MASTER_PORT") or str(20000 + int(job_id) % 20000)


def node_address(node: str, shown: str) -> str:
    """``node``'s NodeAddr in ``shown`` (scontrol show node -o); SLURM sets it to the node name
    where none is configured, and so does this where it is absent."""
    match = _NODE_ADDR.search(shown)
    return match.group(1) if match else node


def job_environment(environ) -> tuple[dict, str]:
    """(the launcher's environment in this job, the line saying where the job runs)."""
    job = environ["SLURM_JOB_ID"]
    nnodes, nodelist = environ.get("SLURM_NNODES", ""), environ.get("SLURM_JOB_NODELIST", "")
    if not nnodes or not nodelist:
        raise SlurmError(f"SLURM_JOB_ID={job} is set but SLURM_NNODES or SLURM_JOB_NODELIST is "
                         f"not: submit it with sbatch")
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    address = node_address(first, _scontrol("show", "node", first, "-o"))
    env = dict(environ, NNODES=nnodes, MASTER_ADDR=address,
               MASTER_PORT=master_port(job, environ))
    gpus = environ.get("GPUS_PER_NODE") or environ.get("SLURM_GPUS_ON_NODE", "")
    if gpus:
        env["GPUS_PER_NODE"] = gpus
    where = (f"SLURM job {job}: {nnodes} node(s) {nodelist}, master {first} "
             f"({address}:{env['MASTER_PORT']})")
    return env, where


def srun_command(nnodes: str, launch: list[str]) -> list[str]:
    # NODE_RANK is each node's own, hence expanded there, inside the step.
    return ["srun", "--kill-on-bad-exit=1", f"--nodes={nnodes}", "--ntasks-per-node=1",
            "bash", "-c", 'NODE_RANK=$SLURM_NODEID exec "$@"', "node", *launch]


def run_step(command: list[str], job_id: str, env: dict) -> int:
    """Run srun's ``command`` to its end, passing a SIGTERM to every process of the job step;
    its exit status."""
    process = subprocess.Popen(command, env=env)

    def pass_sigterm(signum, frame) -> None:
        print("== SIGTERM: passing it to the job step", flush=True)
        subprocess.run(["scancel", "--signal=TERM", job_id])

    signal.signal(signal.SIGTERM, pass_sigterm)
    # The wait goes on after the handler has run (PEP 475), until srun has exited.
    status = process.wait()
    return 128 - status if status < 0 else status


def main(argv=None) -> int:
    launch = sys.argv[1:] if argv is None else argv
    try:
        env, where = job_environment(os.environ)
    except SlurmError as error:
        print(f"error: {NAME}: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"== {where}", flush=True)
    status = subprocess.run([*launch, "--check"], env=dict(env, NODE_RANK="0")).returncode
    if status:
        return status
    return run_step(srun_command(env["NNODES"], launch), env["SLURM_JOB_ID"], env)


if __name__ == "__main__":
    sys.exit(main())
