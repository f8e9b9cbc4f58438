"""A real SLURM (Debian's slurm-wlm: munged, slurmctld, one slurmd on this machine) runs the
stage-1 script through examples/train_slurm.sbatch with TINY=1:

  1. the job trains; `scancel --batch --signal=TERM` (what the time limit does: the wrapper's
     shell alone gets SIGTERM and passes it to the job step) makes it save a checkpoint and
     end COMPLETED;
  2. submitting the same command again resumes from that checkpoint at the saved data position
     and finishes: every step 1..N was trained exactly once across the two jobs.
"""
import re

import pytest

from tests.examples.conftest import read_metrics
from tests.examples.system import SlurmCluster, recipe_env, require, wait_for

STAGE1 = "examples/prolong/04_train_stage1_64k.sh"
STEPS = 6


def _job_output(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sbatch_stops_on_the_time_limit_signal_and_a_resubmission_resumes(tiny_work, tmp_path):
    require(*SlurmCluster.available())
    run_dir = tmp_path / "stage1"
    env = recipe_env(WORK=tiny_work, STAGE1_CKPT=run_dir, TRAIN_STEPS=STEPS, GPUS_PER_NODE=2,
                     STOP_GRACE_S=60)
    with SlurmCluster(tmp_path / "slurm") as slurm:
        first_out = tmp_path / "job-1.out"
        job = slurm.submit([f"--output={first_out}", "examples/train_slurm.sbatch", STAGE1], env)
        # A step trained: the trainer handles SIGTERM from then on.
        wait_for(lambda: re.search(r"^step +1/", _job_output(first_out), re.M), 400,
                 f"job {job}'s first step")
        slurm.slurm("scancel", "--batch", "--signal=TERM", str(job))
        assert slurm.wait(job, 300) == ("COMPLETED", "0:0"), _job_output(first_out)[-4000:]
        output = _job_output(first_out)
        assert f"== SLURM job {job}: 1 node(s)" in output
        assert "== SIGTERM: passing it to the job step" in output
        stopped_at = int((run_dir / "latest").read_text().strip().removeprefix("step_"))
        assert 1 <= stopped_at < STEPS, output[-4000:]
        assert f"SIGTERM received: checkpoint saved at step {stopped_at}, exiting" in output
        assert f"stopped by SIGTERM with checkpoint {run_dir}/step_{stopped_at:08d}" in output

        second_out = tmp_path / "job-2.out"
        job = slurm.submit([f"--output={second_out}", "examples/train_slurm.sbatch", STAGE1], env)
        assert slurm.wait(job, 400) == ("COMPLETED", "0:0"), _job_output(second_out)[-4000:]
        output = _job_output(second_out)
        assert (f"resumed from {run_dir}/step_{stopped_at:08d} at step {stopped_at} "
                f"({2 * stopped_at} samples consumed)") in output, output[-4000:]
    assert (run_dir / "latest").read_text().strip() == f"step_{STEPS:08d}"
    trained = [int(m) for m in re.findall(r"^step +(\d+)/", _job_output(first_out)
                                          + _job_output(second_out), re.M)]
    assert trained == list(range(1, STEPS + 1))  # each step once, none lost or repeated
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert metrics[STEPS]["consumed_samples"] == 2 * STEPS  # global batch 2 (TINY=1)
