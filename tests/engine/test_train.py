"""The training entry point, run as users run it: torchrun -m engine.train --config ... k=v."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed import REPO, free_port, run_command, test_env, torchrun
from tests.engine.conftest import TRAIN_TEST_CONFIG


def metrics(run_dir) -> dict[int, dict]:
    """Last logged record per step (a resumed run logs re-done steps again)."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        records[row["step"]] = row
    return records


def train_args(config, data, ckpt, *overrides):
    return ["--config", config, f"data.path={data}", f"checkpoint.dir={ckpt}", *overrides]


def launch(nproc, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "engine.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=test_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_job(proc):
    """SIGKILL torchrun and every process under it: torchrun starts each worker in a session
    of its own, so killing torchrun's process group alone leaves the workers training."""
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in job:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(job, timeout=60)
    proc.wait()


def wait_for_step(run_dir, step, proc, timeout=240):
    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and any(r >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    kill_job(proc)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_and_resume_reproduces_losses_bit_for_bit(packed_tiny_dataset, train_config,
                                                          tmp_path):
    steps = 6
    reference = tmp_path / "reference"
    torchrun("engine.train", 2, train_args(train_config, packed_tiny_dataset, reference,
                                           "parallel.tensor_parallel=2", f"train_steps={steps}"))
    expected = metrics(reference)
    assert sorted(expected) == list(range(1, steps + 1))
    assert expected[steps]["loss"] < expected[1]["loss"]

    interrupted = tmp_path / "interrupted"
    args = train_args(train_config, packed_tiny_dataset, interrupted,
                      "parallel.tensor_parallel=2", f"train_steps={steps}",
                      "checkpoint.save_interval=1")
    kill_after = random.Random(os.getpid()).randint(2, steps - 2)
    proc = launch(2, args)
    wait_for_step(interrupted, kill_after, proc)
    kill_job(proc)  # every process of the job, no chance to clean up
    # The newest complete checkpoint: step kill_after, or one step either side of it when the
    # kill came between a step's metrics line and its save, or during the next save.
    saved = int((interrupted / "latest").read_text().strip().removeprefix("step_"))
    assert kill_after - 1 <= saved <= kill_after + 1
    lines_before = len((interrupted / "metrics.jsonl").read_text().splitlines())
    result = torchrun("engine.train", 2, args)
    # It resumed (a rerun from step 0 would log the same losses: training is deterministic),
    # at the data position of the checkpoint, in the same layout, so with its RNG states.
    assert (f"resumed from {interrupted / f'step_{saved:08d}'} at step {saved} "
            f"({saved * 4} samples consumed)") in result.stdout
    assert "RNG states not restored" not in result.stdout
    new_lines = (interrupted / "metrics.jsonl").read_text().splitlines()[lines_before:]
    assert [json.loads(line)["step"] for line in new_lines] == list(range(saved + 1, steps + 1))
    resumed = metrics(interrupted)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in expected:
        assert resumed[step]["loss"] == expected[step]["loss"], (step, kill_after)
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], (step, kill_after)
    # Only complete checkpoints were published; no temporary directory looks like one.
    latest = (interrupted / "latest").read_text().strip()
    assert latest == f"step_{steps:08d}"
    assert len(list(interrupted.glob("step_*"))) <= 2  # keep_last


def test_the_console_shows_the_losses_and_the_config_only_with_verbose(
        packed_tiny_dataset, train_config, tmp_path):
    """By default the console holds the plan's one line and the loss lines, not the resolved
    config (written to the run directory instead); --verbose prints it too."""
    import yaml

    from engine.training.config import load_config

    run = tmp_path / "run"
    quiet = torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, run,
                                                   "train_steps=1")).stdout
    written = (run / "config.yaml").read_text()
    assert load_config([str(run / "config.yaml")]) == load_config(
        [train_config], [f"data.path={packed_tiny_dataset}", f"checkpoint.dir={run}",
                         "train_steps=1"])
    assert re.search(r"^step 1/1 \| loss \d+\.\d{4} \| lr ", quiet, re.M), quiet
    assert "run plan: TP1 x PP1 x CP1 x DP1" in quiet
    assert f"resolved config: {run / 'config.yaml'}" in quiet
    assert "resolved config:\n" not in quiet and "collective_timeout_s" not in quiet
    assert yaml.safe_load(written)["collective_timeout_s"] == 60

    # --verbose (here resuming the run for its second step) prints the whole config as well.
    loud = torchrun("engine.train", 1, ["--verbose", *train_args(
        train_config, packed_tiny_dataset, run, "train_steps=2")]).stdout
    assert re.search(r"^step 2/2 \| loss ", loud, re.M), loud
    assert f"resolved config:\n{(run / 'config.yaml').read_text()}" in loud


def test_nan_steps_are_skipped_then_the_run_stops(packed_tiny_dataset, train_config, tmp_path):
    ok = tmp_path / "one_nan"
    torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, ok,
                                           "train_steps=4", "inject_nan_steps=[1]"))
    rows = metrics(ok)
    assert rows[2]["skipped"] and rows[2]["loss"] != rows[2]["loss"]  # NaN, logged
    # Training went on with finite losses and gradients: the NaN never reached the weights.
    for step in (3, 4):
        assert not rows[step]["skipped"]
        assert rows[step]["loss"] == rows[step]["loss"] and rows[step]["grad_norm"] < 100

    # The skipped step did not advance the schedule: step 3 runs at step 2's learning rate.
    assert rows[3]["lr"] == rows[2]["lr"] < rows[1]["lr"]

    stopped = tmp_path / "stopped"
    result = torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, stopped,
                                                    "train_steps=6", "inject_nan_steps=[1,2,3]"),
                      check=False)
    assert result.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in result.stdout


def sigterm_workers(proc) -> None:
    """SIGTERM to each engine.train worker of torchrun job ``proc`` (what a scheduler's
    preemption signal reaches)."""
    for worker in psutil.Process(proc.pid).children(recursive=True):
        if "engine.train" in " ".join(worker.cmdline()) and worker.pid != proc.pid:
            worker.send_signal(signal.SIGTERM)


def preempt(run, args, after_step) -> tuple[str, int]:
    """Launch engine.train (TP2), SIGTERM its workers once step ``after_step`` is logged; the
    job's output and the step its checkpoint was saved at."""
    proc = launch(2, args)
    wait_for_step(run, after_step, proc)
    sigterm_workers(proc)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM received: checkpoint saved" in output
    return output, int((run / "latest").read_text().strip().removeprefix("step_"))


def test_sigterm_saves_a_checkpoint_and_exits_zero(packed_tiny_dataset, train_config, tmp_path):
    """The checkpoint a SIGTERM saves verifies, holds the data position (step x global batch),
    is what latest names, and resumes into the steps an uninterrupted run trains, bit for bit."""
    from engine.checkpoint import read_checkpoint_state, verify_checkpoint

    run = tmp_path / "preempted"
    args = train_args(train_config, packed_tiny_dataset, run, "parallel.tensor_parallel=2",
                      "train_steps=1000")
    _, step = preempt(run, args, 2)
    saved = run / f"step_{step:08d}"
    assert 2 <= step < 1000 and verify_checkpoint(saved)
    assert read_checkpoint_state(saved)["train_state"]["consumed_samples"] == step * 4, (
        "consumed_samples is not step x global_batch (4)")
    assert sorted(p.name for p in run.glob("step_*")) == [saved.name]  # the SIGTERM's own save

    output, last = preempt(run, args, step + 2)
    assert f"resumed from {saved} at step {step} ({step * 4} samples consumed)" in output
    resumed = metrics(run)
    reference = tmp_path / "uninterrupted"
    preempt(reference, train_args(train_config, packed_tiny_dataset, reference,
                                  "parallel.tensor_parallel=2", "train_steps=1000"), last)
    expected = metrics(reference)
    for n in range(step + 1, last + 1):
        assert resumed[n]["loss"] == expected[n]["loss"], (
            f"step {n} after resuming the SIGTERM checkpoint of step {step}: loss "
            f"{resumed[n]['loss']}, {expected[n]['loss']} in the uninterrupted run")
        assert resumed[n]["grad_norm"] == expected[n]["grad_norm"], (
            f"step {n} after resuming the SIGTERM checkpoint of step {step}: grad norm "
            f"{resumed[n]['grad_norm']}, {expected[n]['grad_norm']} in the uninterrupted run")


def test_a_dead_rank_ends_the_job_instead_of_hanging(packed_tiny_dataset, train_config, tmp_path):
    from engine.checkpoint import verify_checkpoint

    run = tmp_path / "dead"
    proc = launch(2, train_args(train_config, packed_tiny_dataset, run,
                                "parallel.tensor_parallel=2", "train_steps=1000"))
    wait_for_step(run, 1, proc)
    workers = [w for w in psutil.Process(proc.pid).children(recursive=True)
               if "engine.train" in " ".join(w.cmdline())]
    workers[-1].kill()
    started = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - started < 120
    # The survivor stops at the collective its peer left, saying so; torchrun names the death.
    assert re.search(r"\[rank0\]: RuntimeError: .*(Connection reset by peer|Connection closed by "
                     r"peer|Broken pipe|timed out)", output), output[-3000:]
    assert f"Signal 9 (SIGKILL) received by PID {workers[-1].pid}" in output, output[-3000:]
    # Whatever was saved before the death is whole, and latest (if any) names such a checkpoint.
    pointer = run / "latest"
    if pointer.exists():
        named = run / pointer.read_text().strip()
        assert named.is_dir() and verify_checkpoint(named), f"latest names {named.name}"
    assert all(verify_checkpoint(path) for path in run.glob("step_*"))


@pytest.mark.parametrize("overrides, message", [
    (["data.path=/nonexistent/packed"], "data.path /nonexistent/packed: no packed dataset there"),
    # transformer-engine's CP attention would attend across packed documents (it masks them
    # only for THD inputs): refused until a GPU test proves otherwise.
    (["parallel.cp_algorithm=transformer-engine"],
     "cp_algorithm 'transformer-engine' is not one of ('all-gather', 'ulysses')"),
    (["data.seq_length=128"], "data.seq_length 128 is larger than the packing length 64"),
    (["parallel.tensor_parallel=2"], "world size 1 is not divisible by TP x PP x CP = 2"),
    (["optimizer.learning_rate=1"], "unknown setting 'learning_rate'"),
    (["data.global_batch=3", "parallel.tensor_parallel=1"], None),
    # Passed the old checks, then failed in the model build after the process group existed.
    (["model.overrides={rope_base: abc}"], "rope_base 'abc' must be a finite positive number"),
])
def test_bad_config_stops_before_training(overrides, message, packed_tiny_dataset, train_config,
                                          tmp_path):
    args = [*train_args(train_config, packed_tiny_dataset, tmp_path / "ckpt"), *overrides]
    if message is None:  # a valid odd batch: DP1 takes 3 micro-batches; must start fine
        args.append("train_steps=1")
    result = run_command([sys.executable, "-m", "engine.train", *args], timeout=120)
    if message is None:
        assert result.returncode == 0, result.stdout[-2000:]
        return
    assert result.returncode == 2, result.stdout[-2000:]
    assert message in result.stdout
    assert "Initializing" not in result.stdout and not (tmp_path / "ckpt").exists()


def _damaged_order_copy(packed, folder):
    """A copy of packed dataset ``packed`` whose order.npy names a source it lacks."""
    import shutil

    import numpy as np
    shutil.copytree(packed, folder)
    order = np.load(folder / "order.npy")
    order[5, 0] = 7
    np.save(folder / "order.npy", order)
    return folder


@pytest.mark.parametrize("case, message", [
    (["model.overrides={num_attention_heads: 0}"],
     "num_attention_heads 0 must be a positive whole number"),
    (["model.overrides={max_position_embeddings: abc}"],
     "max_position_embeddings 'abc' must be a positive whole number"),
    (["model.overrides={rope_base: abc}"], "rope_base 'abc' must be a finite positive number"),
    (["model.overrides={num_layers: -2}"], "num_layers -2 must be a positive whole number"),
    (["seed=1e23"], "seed = 1e+23 must be int"),
    (["seed=100000000000000000000000"], "seed = 100000000000000000000000 must be <= 4294967295"),
    (["collective_timeout_s=1e300"], "collective_timeout_s = 1e+300 must be <= 1000000"),
    (["--config", "{tmp}"], "config file {tmp} is a directory: give a YAML file in it"),
    (["--config", "{tmp}/latin1.yaml"], "config file {tmp}/latin1.yaml is not UTF-8 text"),
    (["data.path={tmp}/damaged"], "{tmp}/damaged/order.npy names source 7, but packed.json "
                                  "lists 2 source(s): the dataset is damaged"),
    (["checkpoint.dir={tmp}/a_file/ckpt"],
     "checkpoint.dir {tmp}/a_file/ckpt/latest: {tmp}/a_file is a file, not a folder"),
    (["checkpoint.dir={tmp}/a_file"],
     "checkpoint.dir {tmp}/a_file/latest: {tmp}/a_file is a file, not a folder"),
    (["logging.dir={tmp}/a_file/logs"],
     "logging.dir {tmp}/a_file/logs/config.yaml: {tmp}/a_file is a file, not a folder"),
    (["logging.dir={tmp}/read_only/logs"],
     "logging.dir {tmp}/read_only/logs/config.yaml: cannot create files in {tmp}/read_only"),
    (["checkpoint.dir={tmp}/read_only"],
     "checkpoint.dir {tmp}/read_only/latest: cannot create files in {tmp}/read_only"),
    (["--world-size", "0"], "--world-size 0: give the run's number of processes (>= 1)"),
    # The final evaluation, after the last step, would have measured nothing.
    (["eval.final=true", "eval.long_documents={data}/long", "eval.position_length=1000"],
     "eval.long_documents {data}/long: no document holds eval.position_length 1000 tokens "
     "(the longest of its 12 holds"),
    # The final report could not be published there, after the last step.
    (["eval.final=true", "eval.long_documents={data}/long", "eval.position_length=32",
      "checkpoint.dir={tmp}/eval_a_file"],
     "eval.final's report folder {tmp}/eval_a_file/eval is a file, where the report folder "
     "would be written"),
    (["eval.final=true", "eval.long_documents={data}/long", "eval.position_length=32",
      "logging.dir={tmp}/eval_not_a_report"],
     "eval.final's report folder {tmp}/eval_not_a_report/eval holds notes.txt, which is not "
     "part of an evaluation report"),
])
def test_check_catches_what_the_run_would_fail_on(case, message, packed_tiny_dataset,
                                                  train_config, tmp_path, capsys, monkeypatch):
    """engine.train --check, in this process: exit 2 naming the setting, its value and the fix,
    no traceback, no process group, nothing written."""
    import errno
    import tempfile

    import torch.distributed as dist

    from data_tools import outputs
    from engine.train import main
    (tmp_path / "latin1.yaml").write_bytes("model: {name: tiny}  # caf\xe9\n".encode("latin-1"))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "eval_a_file").mkdir()
    (tmp_path / "eval_a_file" / "eval").write_text("")
    (tmp_path / "eval_not_a_report" / "eval").mkdir(parents=True)
    (tmp_path / "eval_not_a_report" / "eval" / "notes.txt").write_text("mine")
    _damaged_order_copy(packed_tiny_dataset, tmp_path / "damaged")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # root ignores the mode bits; a read-only mount not
        if dir is not None and Path(dir) == read_only:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    data = str(Path(packed_tiny_dataset).parent)
    case = [part.replace("{tmp}", str(tmp_path)).replace("{data}", data) for part in case]
    args = train_args(train_config, packed_tiny_dataset, tmp_path / "ckpt")
    if case[0] == "--config":
        args[1] = case[1]
    elif case[0] == "--world-size":
        args = case + args
    else:
        args += case
    assert main(["--check", *args]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)).replace("{data}", data) in err, err
    assert "Traceback" not in err and not dist.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_taken_master_port_is_refused_before_the_process_group(
        packed_tiny_dataset, train_config, tmp_path, capsys, monkeypatch):
    """The run itself (no --check) stops with exit 2 naming MASTER_PORT, instead of a
    DistNetworkError traceback from init_process_group."""
    import socket

    import torch.distributed as dist

    from engine.train import main
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        for check in (["--check"], []):
            assert main([*check, *train_args(train_config, packed_tiny_dataset,
                                             tmp_path / "ckpt")]) == 2
            err = capsys.readouterr().err
            assert (f"MASTER_PORT {port} cannot be used (another process is listening on it): "
                    f"set MASTER_PORT to a free port") in err, err
    assert not dist.is_initialized() and not (tmp_path / "ckpt").exists()


def test_resume_of_another_model_shape_is_refused_before_anything_is_written(
        packed_tiny_dataset, train_config, tmp_path, capsys):
    """The run directory of a 2-layer run, resumed with num_layers 4: --check refuses it (it
    said "run plan ok"), and so does the run, before the process group and without replacing
    the run's config.yaml."""
    import torch.distributed as dist

    from engine.train import main
    run = tmp_path / "run"
    result = run_command([sys.executable, "-m", "engine.train",
                          *train_args(train_config, packed_tiny_dataset, run, "train_steps=1")],
                         timeout=180)
    assert result.returncode == 0, result.stdout[-2000:]
    saved = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for check in (["--check"], []):
        assert main([*check, *train_args(train_config, packed_tiny_dataset, run,
                                         "model.overrides={num_layers: 4}")]) == 2
        err = capsys.readouterr().err
        assert "num_layers: checkpoint 2 vs config 4" in err and "checkpoint.dir" in err, err
        assert not dist.is_initialized()
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved


def test_checkpoint_of_another_model_shape_is_refused(packed_tiny_dataset, train_config,
                                                      tmp_path):
    first = tmp_path / "first"
    torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, first,
                                           "train_steps=1"))
    result = run_command([sys.executable, "-m", "engine.train",
                          *train_args(train_config, packed_tiny_dataset, tmp_path / "second",
                                      f"checkpoint.init_from={first}",
                                      "model.overrides={num_layers: 4}")], timeout=120)
    assert result.returncode == 2
    assert "num_layers: checkpoint 2 vs config 4" in result.stdout


def test_next_stage_starts_from_checkpoint_with_new_rope_base_and_schedule(
        packed_tiny_dataset, train_config, tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, stage1,
                                           "train_steps=3"))
    result = torchrun("engine.train", 1, train_args(
        train_config, packed_tiny_dataset, stage2, f"checkpoint.init_from={stage1}",
        "model.overrides={num_layers: 2, rope_base: 8.0e6}", "optimizer.lr=2.5e-4",
        "train_steps=2"))
    assert "initialized from" in result.stdout and "new RoPE base 8e+06" in result.stdout
    first, second = metrics(stage1), metrics(stage2)
    # This run's schedule, not the loaded optimizer's: lr 2.5e-4 at step 1 (no warm-up).
    assert second[1]["lr"] == pytest.approx(2.5e-4)
    # Trained weights were loaded: the new run starts well below the untrained loss.
    assert second[1]["loss"] < first[1]["loss"] - 0.05


def test_checkpoint_resumes_in_another_layout(packed_tiny_dataset, train_config, tmp_path):
    """Saved under TP2 (with the distributed optimizer over DP1), resumed under PP2: the next
    step's loss and grad norm match the run that stayed in TP2."""
    import shutil

    tp2 = tmp_path / "tp2"
    torchrun("engine.train", 2, train_args(train_config, packed_tiny_dataset, tp2,
                                           "parallel.tensor_parallel=2", "train_steps=3",
                                           "checkpoint.save_interval=2", "checkpoint.keep_last=3"))
    pp2 = tmp_path / "pp2"
    pp2.mkdir()
    shutil.copytree(tp2 / "step_00000002", pp2 / "step_00000002")
    (pp2 / "latest").write_text("step_00000002\n")
    result = torchrun("engine.train", 2, train_args(train_config, packed_tiny_dataset, pp2,
                                                    "parallel.pipeline_parallel=2",
                                                    "train_steps=3"))
    assert "resumed from" in result.stdout
    # A rank's saved RNG belongs to its TP2 position: not restored under PP2.
    assert ("RNG states not restored (checkpoint layout TP2 x PP1 x CP1 x DP1, this run "
            "TP1 x PP2 x CP1 x DP1") in result.stdout
    expected, resumed = metrics(tp2)[3], metrics(pp2)[3]
    assert resumed["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert resumed["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("algorithm", ["all-gather", "ulysses"])
def test_context_parallel_training_on_packed_data_matches_one_process(
        algorithm, packed_tiny_dataset, train_config, tmp_path):
    """CP2 reads only its chunks of each packed sequence and trains like the single process."""
    single, cp2 = tmp_path / "single", tmp_path / "cp2"
    torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, single,
                                           "train_steps=2", "optimizer.lr=1e-4"))
    torchrun("engine.train", 2, train_args(train_config, packed_tiny_dataset, cp2,
                                           "train_steps=2", "optimizer.lr=1e-4",
                                           "parallel.context_parallel=2",
                                           f"parallel.cp_algorithm={algorithm}"))
    expected, actual = metrics(single), metrics(cp2)
    for step in (1, 2):
        assert actual[step]["valid_tokens"] == expected[step]["valid_tokens"]
        assert actual[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)
        assert actual[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5)


def test_data_settings_train_alike_under_context_and_data_parallelism(
        packed_tiny_dataset, train_config, tmp_path):
    """data.mask_cross_document false, data.position_mode document and (CP2 x DP2)
    data.balance_attention true, end to end: one process, CP2 and CP2 x DP2 train the same
    global batches to the same losses, grad norms and valid-token counts."""
    import numpy as np

    from data_tools.packed_dataset import PackedDataset

    settings = ["data.mask_cross_document=false", "data.position_mode=document",
                "data.global_batch=8", "train_steps=2", "optimizer.lr=1e-4"]
    runs = {"single": (1, []), "cp2": (2, ["parallel.context_parallel=2"]),
            "cp2_dp2_balanced": (4, ["parallel.context_parallel=2",
                                     "data.balance_attention=true"])}
    logged = {}
    for name, (nproc, extra) in runs.items():
        torchrun("engine.train", nproc, train_args(train_config, packed_tiny_dataset,
                                                   tmp_path / name, *settings, *extra))
        logged[name] = metrics(tmp_path / name)

    dataset = PackedDataset(packed_tiny_dataset)
    in_order = {}
    for step in (1, 2):
        doc_lengths = [dataset.document_lengths(i) for i in range(8 * (step - 1), 8 * step)]
        # Without the cross-document mask every target counts but each sample's last: 8 x 63,
        # where the mask would drop one per document end inside a sample.
        assert sum(len(lengths) - 1 for lengths in doc_lengths) > 0
        for name in runs:
            assert logged[name][step]["valid_tokens"] == 8 * 63, (name, step)
        for name in ("cp2", "cp2_dp2_balanced"):
            for key in ("loss", "grad_norm"):
                assert logged[name][step][key] == pytest.approx(logged["single"][step][key],
                                                                rel=1e-5), (name, step, key)
        # Balancing changed which DP rank trains which samples (the loss over the global batch
        # stays that of the same set): the heavier rank's attention cost (sum of squared
        # document lengths) over the mean never exceeds the in-order split's...
        costs = [int((np.asarray(lengths) ** 2).sum()) for lengths in doc_lengths]
        in_order[step] = max(sum(costs[:4]), sum(costs[4:])) / (sum(costs) / 2)
        assert logged["cp2_dp2_balanced"][step]["attention_imbalance"] <= in_order[step] + 1e-12
        assert logged["single"][step]["attention_imbalance"] == 1.0
    # ... and is below it at step 2, where the in-order split is uneven (1.100 vs 1.083).
    assert logged["cp2_dp2_balanced"][2]["attention_imbalance"] < in_order[2] - 0.01


def test_gradients_average_over_tokens_not_micro_batches():
    """Micro-batches with 30 and 5 valid tokens: the step's gradient is that of
    sum(token losses) / 35, not the mean of the two micro-batch means."""
    result = torchrun("tests.engine.token_average_worker", 1, [])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["reported_loss"] == pytest.approx(report["expected_loss"], rel=1e-6)
    assert report["error_vs_token_average"] < 1e-6
    assert report["error_vs_microbatch_average"] > 0.05


def test_rng_is_restored_only_under_the_saved_layouts_sizes():
    """Each rank's RNG file belongs to its position in the saving layout: the same sizes put
    the same shard on the same rank; any other size (or rank count) does not."""
    from engine.checkpoint import same_sizes
    from engine.parallel.layout import ParallelLayout

    saved = ParallelLayout(tensor_parallel=2, data_parallel=2).to_dict()
    # SP, the distributed optimizer and the CP algorithm move no rank.
    assert same_sizes(saved, ParallelLayout(tensor_parallel=2, data_parallel=2,
                                            sequence_parallel=True, distributed_optimizer=True))
    for other in (ParallelLayout(pipeline_parallel=2, data_parallel=2),
                  ParallelLayout(tensor_parallel=2, context_parallel=2),
                  ParallelLayout(tensor_parallel=2, data_parallel=4),
                  ParallelLayout(tensor_parallel=4),
                  ParallelLayout(tensor_parallel=2, pipeline_parallel=2, virtual_stages=2)):
        assert not same_sizes(saved, other), other


def test_warmup_starts_at_lr_over_warmup_steps(packed_tiny_dataset, train_config, tmp_path):
    """W = 0.5 x 6 = 3 warm-up steps: step k of the warm-up trains at lr x k / 3 (step 1
    already trains), step W at lr, then the cosine decay over the remaining steps, to exactly
    lr x min_lr_ratio at the end of the run (the scheduler state the final checkpoint holds)."""
    import math

    from engine.checkpoint import latest_checkpoint, read_checkpoint_state

    run = tmp_path / "warmup"
    torchrun("engine.train", 1, train_args(train_config, packed_tiny_dataset, run,
                                           "train_steps=6", "optimizer.warmup_fraction=0.5"))
    rows = metrics(run)
    lr, min_lr = 1e-3, 1e-3 * 0.1  # TRAIN_TEST_CONFIG; min_lr_ratio's default

    def scheduled(done):
        """The lr after ``done`` scheduler steps: warm-up to lr over steps 1-3, then a cosine
        from lr at step 3 to min_lr when the 6 steps are done (step k trains at done = k - 1)."""
        if done <= 2:
            return lr / 3 + (lr - lr / 3) * done / 2
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (done - 2) / (6 - 2)))

    for step in (1, 2, 3):
        assert rows[step]["lr"] == pytest.approx(lr * step / 3, rel=1e-9), step
    for step in (4, 5, 6):
        assert rows[step]["lr"] == pytest.approx(scheduled(step - 1), rel=1e-9), (
            f"step {step} trained at lr {rows[step]['lr']}, the cosine to lr x min_lr_ratio "
            f"gives {scheduled(step - 1)}")
    scheduler = read_checkpoint_state(latest_checkpoint(run))["scheduler"]
    assert scheduler["num_steps"] == 6 and scheduler["min_lr"] == pytest.approx(min_lr), (
        f"the run ended at lr {scheduler['min_lr']} after {scheduler['num_steps']} steps, not "
        f"lr x min_lr_ratio = {min_lr}")
    assert scheduled(6) == pytest.approx(min_lr, rel=1e-12)


def reordered_copy(dataset, folder, rows) -> str:
    """A copy of a packed dataset whose training order is the original's sequences ``rows``
    (order.npy rewritten; the token files stay the original's)."""
    import shutil

    import numpy as np

    shutil.copytree(dataset, folder)
    order = np.load(Path(dataset) / "order.npy")[list(rows)]
    np.save(folder / "order.npy", order)
    info = json.loads((folder / "packed.json").read_text())
    info["num_sequences"] = len(order)
    (folder / "packed.json").write_text(json.dumps(info))
    return str(folder)


def test_resume_with_another_global_batch_reads_on_from_the_saved_position(
        packed_tiny_dataset, train_config, tmp_path):
    """Saved after 2 steps of 4 samples, resumed with a global batch of 2 on a dataset of 9
    samples: step 3 reads samples 8 and 0 (the last one and, with a warning, the first of a
    second pass), and its loss is what the saved weights give on exactly those samples."""
    nine = reordered_copy(packed_tiny_dataset, tmp_path / "nine", range(9))
    run = tmp_path / "run"
    torchrun("engine.train", 1, train_args(train_config, nine, run, "train_steps=2"))
    assert metrics(run)[2]["consumed_samples"] == 8
    result = torchrun("engine.train", 1, train_args(train_config, nine, run, "train_steps=3",
                                                    "data.global_batch=2"))
    assert f"resumed from {run / 'step_00000002'} at step 2 (8 samples consumed)" in result.stdout
    assert (f"warning: step 3 starts pass 2 over {nine} (9 samples of 64 tokens per pass): "
            f"samples repeat from here on") in result.stdout
    assert result.stdout.count("starts pass") == 1
    resumed = metrics(run)[3]
    assert resumed["consumed_samples"] == 10

    # The same weights on samples 8 and 0, read by a fresh start whose data begin with them.
    first_two = reordered_copy(packed_tiny_dataset, tmp_path / "from8", [8, 0])
    fresh = tmp_path / "fresh"
    torchrun("engine.train", 1, train_args(train_config, first_two, fresh,
                                           f"checkpoint.init_from={run / 'step_00000002'}",
                                           "train_steps=1", "data.global_batch=2"))
    expected = metrics(fresh)[1]
    assert resumed["valid_tokens"] == expected["valid_tokens"]
    assert resumed["loss"] == expected["loss"]


@pytest.fixture(scope="module")
def bf16_run(packed_tiny_dataset, tmp_path_factory):
    """4 bf16 steps on one process (CPU), saving at steps 2 and 4."""
    root = tmp_path_factory.mktemp("bf16")
    config = root / "train.yaml"
    config.write_text(TRAIN_TEST_CONFIG)
    run = root / "whole"
    result = torchrun("engine.train", 1, train_args(
        str(config), packed_tiny_dataset, run, "bf16=true", "train_steps=4",
        "checkpoint.save_interval=2", "checkpoint.keep_last=3"))
    assert "tokens per step (4 micro-batches of 1), bf16, kernels" in result.stdout
    return str(config), run


def test_bf16_resume_reproduces_the_uninterrupted_losses(bf16_run, packed_tiny_dataset,
                                                        tmp_path):
    import shutil

    config, whole = bf16_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "step_00000002", resumed / "step_00000002")
    (resumed / "latest").write_text("step_00000002\n")
    result = torchrun("engine.train", 1, train_args(config, packed_tiny_dataset, resumed,
                                                    "bf16=true", "train_steps=4"))
    assert "at step 2 (8 samples consumed)" in result.stdout
    expected, actual = metrics(whole), metrics(resumed)
    assert sorted(actual) == [3, 4]
    for step in (3, 4):  # bf16 weights, fp32 master weights and Adam state all came back
        assert actual[step]["loss"] == expected[step]["loss"], step
        assert actual[step]["grad_norm"] == expected[step]["grad_norm"], step


def test_bf16_weights_only_start_trains_from_the_loaded_weights(bf16_run, packed_tiny_dataset,
                                                                tmp_path):
    """checkpoint.init_from without the optimizer, in bf16: the fresh optimizer's fp32 master
    weights must take the loaded weights, or its first step writes the random init back."""
    config, stage1 = bf16_run
    stage2 = tmp_path / "stage2"
    torchrun("engine.train", 1, train_args(config, packed_tiny_dataset, stage2, "bf16=true",
                                           f"checkpoint.init_from={stage1}",
                                           "checkpoint.init_load_optimizer=false",
                                           "train_steps=2"))
    first, second = metrics(stage1), metrics(stage2)
    # Both stages read samples 0-3 at step 1 and 4-7 at step 2 (random tokens: what a model
    # learns of them is the samples it saw). Stage 2's step 1 runs on the loaded weights; its
    # step 2 on them after one more update, not on the random init (which gives ~first[2]).
    assert second[1]["loss"] < first[1]["loss"] - 0.1  # measured: 5.99 vs 6.23
    assert second[2]["loss"] < first[2]["loss"] - 0.05  # 6.13 vs 6.25 (random init: 6.25)
