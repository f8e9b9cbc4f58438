"""Two real hosts: network namespaces joined by a veth pair, one torchrun agent each, the
rendezvous and gloo over the veth addresses -- launched by the recipe's own stage script.

One scenario, PP2 across the hosts x TP2 within each, 6 steps, a checkpoint every 2:
  1. the same layout on one host (4 processes) is the reference;
  2. the two hosts train until a checkpoint exists, then host 1 dies (every process in its
     namespace SIGKILLed): host 0's processes exit within 60 s naming host 1's address;
  3. a relaunch on both resumes from the last checkpoint and is stopped by SIGTERM, which
     leaves a newer checkpoint;
  4. a relaunch resumes again and finishes; every step's loss and grad norm equal the
     one-host run's, and the export equals the one-host export tensor for tensor.
"""
import json
import re
import time

import pytest
from safetensors.torch import load_file

from tests.distributed import free_port
from tests.examples.conftest import read_metrics
from tests.examples.system import NetnsHosts, Process, recipe_env, require, wait_for

STAGE1 = "examples/prolong/04_train_stage1_64k.sh"
EXPORT = "examples/prolong/07_export_hf.sh"
STEPS = 6
LAUNCH = dict(TP=2, PP=2, GPUS_PER_NODE=2, TRAIN_STEPS=STEPS, SAVE_INTERVAL=2, STOP_GRACE_S=60,
              RDZV_TIMEOUT_S=120)


def _latest_step(run_dir) -> int:
    latest = run_dir / "latest"
    return int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else -1


def _steps_trained(process) -> list[int]:
    """The steps this launch trained, from its progress lines."""
    return [int(m) for m in re.findall(r"^step +(\d+)/\d+ \|", process.output(), re.M)]


def _launch_both(hosts, env, tmp_path, name):
    return [hosts.launch(h, STAGE1, env, tmp_path / f"{name}-host{h}.log") for h in (0, 1)]


def _export(tiny_work, run_dir, out):
    result = Process(["bash", EXPORT], recipe_env(
        WORK=tiny_work, EXPORT_FROM=run_dir, HF_OUT=out,
        TOKENIZER_DIR=tiny_work / "hf-tiny-llama3"), out.parent / f"{out.name}.log")
    assert result.wait(300) == 0, result.output()[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 8e6 and config["vocab_size"] == 128_256
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_hosts_lose_a_host_stop_resume_and_match_one_host(tiny_work, tmp_path):
    require(*NetnsHosts.available())
    reference_dir = tmp_path / "one-host"
    reference = Process(["bash", STAGE1], recipe_env(
        WORK=tiny_work, STAGE1_CKPT=reference_dir, **dict(LAUNCH, GPUS_PER_NODE=4),
        MASTER_PORT=free_port()), tmp_path / "one-host.log")
    assert reference.wait(600) == 0, reference.output()[-4000:]

    run_dir = tmp_path / "two-hosts"
    env = recipe_env(WORK=tiny_work, STAGE1_CKPT=run_dir, **LAUNCH)
    with NetnsHosts() as hosts:
        lost = hosts.addresses[1]
        # 2. Host 1 dies after the first checkpoint.
        first = _launch_both(hosts, env, tmp_path, "fault")
        wait_for(lambda: _latest_step(run_dir) >= 2, 300, "the first checkpoint", first[0])
        hosts.kill_host(1)
        killed_at = time.monotonic()
        status = first[0].wait(120)
        took = time.monotonic() - killed_at
        output = first[0].output()
        assert status != 0, output[-4000:]
        assert took < 60, f"host 0 took {took:.0f} s to stop after host 1 died"
        assert f"lost node(s) {lost}" in output, output[-4000:]
        assert any(f"[{lost}]:" in line and "by peer" in line for line in output.splitlines())
        first[1].wait(30)
        resumed_at = _latest_step(run_dir)
        assert 2 <= resumed_at < STEPS

        # 3. Relaunch: resumes from the last checkpoint; SIGTERM to both scripts stops it.
        second = _launch_both(hosts, env, tmp_path, "stop")
        # A step of this launch: the trainer handles SIGTERM from then on.
        wait_for(lambda: _steps_trained(second[0]), 300, "a step after resuming", second[0])
        for process in second:
            process.terminate_script()
        assert [p.wait(180) for p in second] == [0, 0], second[0].output()[-4000:]
        output = second[0].output()
        assert f"resumed from {run_dir}/step_{resumed_at:08d} at step {resumed_at}" in output
        stopped_at = _latest_step(run_dir)
        assert resumed_at < stopped_at
        assert f"stopped by SIGTERM with checkpoint {run_dir}/step_{stopped_at:08d}" in output

        # 4. Relaunch: resumes from the SIGTERM checkpoint and finishes.
        if stopped_at < STEPS:
            third = _launch_both(hosts, env, tmp_path, "finish")
            assert [p.wait(300) for p in third] == [0, 0], third[0].output()[-4000:]
            assert (f"resumed from {run_dir}/step_{stopped_at:08d} at step {stopped_at}"
                    in third[0].output())
        assert _latest_step(run_dir) == STEPS

    one_host, two_hosts = read_metrics(reference_dir), read_metrics(run_dir)
    assert sorted(one_host) == sorted(two_hosts) == list(range(1, STEPS + 1))
    for step in one_host:
        # The same 4 ranks in the same groups: the same arithmetic, bit for bit.
        assert two_hosts[step]["loss"] == one_host[step]["loss"], step
        assert two_hosts[step]["grad_norm"] == one_host[step]["grad_norm"], step
    exported = _export(tiny_work, run_dir, tmp_path / "hf-two-hosts")
    expected = _export(tiny_work, reference_dir, tmp_path / "hf-one-host")
    assert sorted(exported) == sorted(expected) and len(exported) == 3 + 9 * 4
    for name, tensor in expected.items():
        assert exported[name].equal(tensor), name
