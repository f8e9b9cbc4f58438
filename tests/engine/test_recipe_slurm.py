"""engine.recipe.slurm, the batch step of examples/train_slurm.sbatch, with stand-ins for scontrol,
srun and scancel: the job's node 0 address and per-job port reach the launcher, its --check
runs before srun, and a SIGTERM to the batch step reaches the job step's processes, which are
waited for to their end (the real SLURM run: tests/examples/test_slurm.py)."""
import os
import signal
import subprocess
import sys
import time

from tests.distributed import REPO, test_env

STAND_INS = {
    "scontrol": """case $2 in
  hostnames) echo node7; echo node8 ;;
  node) echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=$3" ;;
esac
""",
    # Runs the step's one task here, as node 0.
    "srun": """echo "$*" > "$LOG_DIR/srun.args"
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
""",
    "scancel": """echo "$*" > "$LOG_DIR/scancel.args"
kill -TERM "$(cat "$LOG_DIR/launcher.pid")"
""",
}
# The launcher: --check reports what it was given; the run waits for SIGTERM, then takes a
# moment to "save" before it exits.
LAUNCHER = """echo "$* NODE_RANK=$NODE_RANK NNODES=$NNODES MASTER_ADDR=$MASTER_ADDR \
MASTER_PORT=$MASTER_PORT GPUS_PER_NODE=${GPUS_PER_NODE-unset}"
[[ " $* " == *" --check "* ]] && exit 0
trap 'sleep 1; echo saved; exit 0' TERM
echo $$ > "$LOG_DIR/launcher.pid"
while :; do sleep 0.1; done
"""


def _job(tmp_path, launcher=LAUNCHER, **environ):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "launcher.sh").write_text(launcher)
    env = test_env(**{"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path),
                      "SLURM_JOB_ID": "12345", "SLURM_NNODES": "2",
                      "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_GPUS_ON_NODE": "4", **environ})
    if "MASTER_PORT" not in environ:
        env.pop("MASTER_PORT")  # the job's own port
    return subprocess.Popen([sys.executable, "-m", "engine.recipe.slurm", "bash",
                             str(tmp_path / "launcher.sh"), "a.b=c"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_launch_is_checked_then_run_on_every_node_and_a_sigterm_reaches_it(tmp_path):
    job = _job(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "launcher.pid").exists():
            assert time.monotonic() < deadline and job.poll() is None, job.stdout.read()
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 does
        output, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 0, output
    given = "NNODES=2 MASTER_ADDR=10.0.0.7 MASTER_PORT=32345 GPUS_PER_NODE=4"
    lines = output.splitlines()
    assert lines[:2] == [
        "== SLURM job 12345: 2 node(s) node[7-8], master node7 (10.0.0.7:32345)",
        f"a.b=c --check NODE_RANK=0 {given}"]
    assert lines[2:] == [f"a.b=c NODE_RANK=0 {given}", "== SIGTERM: passing it to the job step",
                         "saved"]  # the step was waited for to its end
    assert (tmp_path / "srun.args").read_text().split()[:6] == [
        "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
        "NODE_RANK=$SLURM_NODEID"]
    assert (tmp_path / "scancel.args").read_text().split() == ["--signal=TERM", "12345"]


def test_a_refused_check_starts_no_step_and_a_set_port_wins(tmp_path):
    job = _job(tmp_path, 'echo "checked $MASTER_PORT $GPUS_PER_NODE"; exit 3\n',
               MASTER_PORT="29999", GPUS_PER_NODE="2")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 3 and "checked 29999 2" in output
    assert not (tmp_path / "srun.args").exists()


def test_a_job_without_its_node_list_is_refused(tmp_path):
    job = _job(tmp_path, SLURM_NNODES="")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 2
    assert ("error: train_slurm.sbatch: SLURM_JOB_ID=12345 is set but SLURM_NNODES or "
            "SLURM_JOB_NODELIST is not: submit it with sbatch") in output
