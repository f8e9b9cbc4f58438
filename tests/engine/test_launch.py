"""engine.launch: the torchrun command of a run from its configs and launch settings, the layout
as set or the planner's, and every bad setting refused with exit code 2 naming it before any
command is run or written."""
import json

import pytest

from engine import launch
from engine.model.config import get_model_config
from engine.planner.__main__ import layout_overrides
from engine.planner.memory import Workload
from engine.planner.plan import plan_layouts

STAGE1 = "engine/configs/prolong-stage1-64k.yaml"


@pytest.fixture
def run(tmp_path):
    """A packed dataset of 65,536-token sequences and the overrides naming it and a run folder."""
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "packed.json").write_text(json.dumps({"seq_length": 65536}))
    return [f"data.path={tmp_path / 'packed'}", f"checkpoint.dir={tmp_path / 'run'}"]


def _plan(args, configs=(STAGE1,), environ=None, **options):
    settings, overrides = launch.read_settings(args, environ or {})
    return launch.plan_launch(list(configs), settings, overrides, check=True, python="py",
                              **options)


def test_tp_pp_cp_as_set_make_the_command_with_overrides_last(run):
    result = _plan(["NNODES=2", "NODE_RANK=1", "MASTER_ADDR=node0", "MASTER_PORT=29400",
                    "TP=1", "CP=4", "RECOMPUTE=full", "GLOBAL_BATCH=32", *run,
                    "optimizer.lr=3e-6"], environ={"SLURM_JOB_ID": "77"})
    assert result.world_size == 16
    assert result.command[:21] == [
        "py", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1",
        "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400",
        "--rdzv-id", "77", "--rdzv-conf", "timeout=900,is_host=false", "--max-restarts", "0",
        "-m", "engine.train"]
    assert result.train_args == [
        "--config", STAGE1, "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
        "parallel.context_parallel=4", "parallel.sequence_parallel=false",
        "parallel.recompute=full", "data.global_batch=32", *run, "optimizer.lr=3e-6"]
    assert result.command[21:] == result.train_args
    assert result.notes[1] == "layout as set (TP=1 PP=1 CP=4)"


def test_verbose_asks_the_training_run_to_print_its_resolved_config(run):
    quiet = _plan(["TP=8", *run])
    verbose = _plan(["TP=8", "VERBOSE=1", *run], environ={"VERBOSE": "0"})
    start = quiet.command.index("engine.train") + 1
    assert verbose.command == [*quiet.command[:start], "--verbose", *quiet.command[start:]]
    assert "--verbose" not in quiet.command
    # The one-process check and the dry run take the same engine.train arguments, without it.
    assert verbose.train_args == quiet.train_args
    assert _plan(["TP=8", *run], environ={"VERBOSE": "1"}).command == verbose.command
    with pytest.raises(launch.LaunchSettingError, match="VERBOSE=yes must be 0 or 1"):
        _plan(["TP=8", "VERBOSE=yes", *run])


def test_without_tp_pp_cp_the_layout_is_the_planners(run):
    result = _plan(["NNODES=8", *run])
    fitting, _ = plan_layouts(get_model_config("llama3-8b"), Workload(65536), 64, 80.0,
                              ("all-gather", "ulysses"), 64)
    expected = layout_overrides(fitting[0].layout).split()
    assert result.train_args[2:2 + len(expected)] == expected
    assert result.notes[1].startswith("layout recommended by: python -m engine.planner "
                                      "--model llama3-8b --seq-length 65536 --gpus 64")


def test_the_configs_layout_when_asked_and_none_is_set(tmp_path, run):
    config = tmp_path / "run.yaml"
    config.write_text("model: {name: tiny}\nparallel: {tensor_parallel: 2, pipeline_parallel: 2}\n")
    result = _plan([*run], configs=[str(config)], layout_from_config=True)
    assert result.train_args[2:5] == ["parallel.tensor_parallel=2",
                                      "parallel.pipeline_parallel=2", "parallel.context_parallel=1"]
    assert _plan(["CP=2", *run], configs=[str(config)], layout_from_config=True).notes[1] == \
        "layout as set (TP=1 PP=1 CP=2)"
    with pytest.raises(launch.LaunchSettingError, match="checkpoint.dir is not set"):
        _plan([run[0]], configs=[str(config)])


def test_settings_given_as_arguments_win_over_the_environment():
    settings, overrides = launch.read_settings(["NNODES=4", "a.b=c"], {"NNODES": "2", "TP": "8"})
    assert (settings["NNODES"], settings["TP"], settings["RDZV_ID"]) == ("4", "8", "longctx")
    assert overrides == ["a.b=c"]


@pytest.mark.parametrize("args,message", [
    (["NNODES=2", "NODE_RANK=2"], "NODE_RANK=2 must be below NNODES=2"),
    (["GPUS_PER_NODE=eight"], "GPUS_PER_NODE=eight must be an integer >= 1"),
    (["TP=3"], "TP x PP x CP = 3 x 1 x 1 does not divide NNODES x GPUS_PER_NODE = 8"),
    (["RECOMPUTE=some"], "RECOMPUTE=some must be none, selective or full"),
    (["CP_ALGORITHM=ring"], "CP_ALGORITHM=ring must be all-gather or ulysses"),
    (["GPUS_PER_NODE=6"], "the planner found no layout for llama3-8b at 65536 tokens on 6 x 80"),
    (["TRAIN_STEPS=-1"], "TRAIN_STEPS=-1 must be an integer >= 0"),
    (["NODES=2"], "unknown launch setting NODES"),
    (["data.path=/nonexistent"], "no packed dataset at data.path=/nonexistent (no packed.json)"),
])
def test_a_bad_setting_exits_2_naming_it_and_prints_no_command(tmp_path, capsys, run, args,
                                                                message):
    code = launch.main(["--check", "--name", "04.sh", "--config", STAGE1, *run, *args])
    captured = capsys.readouterr()
    assert code == 2 and f"error: 04.sh: {message}" in captured.err, captured.err
    assert "Traceback" not in captured.err and "torch.distributed.run" not in captured.out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,message", [
    (None, "config file {path} does not exist"),
    ("- a\n", "{path}: the top level must be a mapping of sections"),
    ("data: {path: [1,\n", "{path}: not valid YAML"),
    ("data: {global_batch: many}\n", "{path}: data.global_batch"),
])
def test_a_bad_config_exits_2_naming_the_file(tmp_path, capsys, run, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert launch.main(["--check", "--config", str(path), *run]) == 2
    assert message.format(path=path) in capsys.readouterr().err


def test_get_reads_the_merged_configs_as_engine_train_does(tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model: {name: llama3-8b}\ndata: {global_batch: 64}\n")
    second.write_text("data: {global_batch: 2}\n")
    assert launch.main(["--get", "data.global_batch", "--config", str(first),
                        "--config", str(second)]) == 0
    assert launch.main(["--get", "model.name", "--config", str(first)]) == 0
    assert launch.main(["--get", "data.micro_batch", "--config", str(first)]) == 0  # a default
    assert capsys.readouterr().out.split() == ["2", "llama3-8b", "1"]
    assert launch.main(["--get", "data.nothing", "--config", str(first)]) == 2


@pytest.fixture
def eval_inputs(tmp_path):
    """Two engine run folders (one under a path holding a space), an exported Hugging Face
    folder and a tokenizer file, as far as the evaluation launch's checks look."""
    runs = {name: tmp_path / folder for name, folder in (("base", "ckpt/base"),
                                                          ("s1", "ckpt/stage 1"))}
    for folder in runs.values():
        folder.mkdir(parents=True)
        (folder / "latest").write_text("step_00000000\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_text("")
    settings = [f"TOKENIZER={tmp_path / 'tokenizer.model'}", f"EVAL_OUT={tmp_path / 'eval'}"]
    return runs, tmp_path / "hf", settings


def _evaluation(args, **options):
    settings, overrides = launch.read_eval_settings(args, {})
    return launch.plan_evaluation(settings, overrides, python="py", **options)


def test_the_evaluation_commands_from_the_settings(eval_inputs, tmp_path):
    runs, hf, settings = eval_inputs
    out = tmp_path / "eval"
    result = _evaluation([
        f"EVAL_CHECKPOINTS=base={runs['base']}\ns1={runs['s1']}", f"EVAL_HF=hf={hf}",
        "EVAL_LENGTHS=256 512", "EVAL_DEPTHS=0.5", "EVAL_TASKS=niah_single json_kv",
        "EVAL_GPUS=4", "EVAL_TP=2", "EVAL_RULER_TASKS=vt fwe", "EVAL_RULER_SAMPLES=3",
        *settings, "parallel.recompute=full"])
    args = ["--checkpoint", f"base={runs['base']}", "--checkpoint", f"s1={runs['s1']}",
            "--hf", f"hf={hf}", "--tokenizer", str(tmp_path / "tokenizer.model"),
            "--lengths", "256", "512", "--depths", "0.5", "--samples", "20", "--tasks",
            "niah_single", "json_kv", "--out", str(out), "--no-progress", "parallel.tensor_parallel=2",
            "parallel.pipeline_parallel=1", "parallel.context_parallel=1",
            "parallel.cp_algorithm=all-gather", "parallel.sequence_parallel=true",
            "parallel.recompute=full"]
    assert result.command == ["py", "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node", "4", "-m", "engine.evaluate", *args]
    assert result.check == ["py", "-m", "engine.evaluate", "--check", "--world-size", "4", *args]
    # engine.evaluate reads them so: the tasks end before the overrides.
    from engine.evaluate.__main__ import _parser

    parsed = _parser().parse_args(args)
    assert parsed.tasks == ["niah_single", "json_kv"] and parsed.overrides == args[-6:]
    assert result.ruler == [[
        "py", "-m", "engine.evaluate", "--protocol", "ruler", "--hf", str(hf), "--tokenizer",
        str(tmp_path / "tokenizer.model"), "--tasks", "vt", "fwe", "--lengths", "256", "512",
        "--samples", "3", "--chat-template", "--out", f"{out}/ruler-hf"]]

    # Hugging Face folders only: one process, checked as one; documents and no TP.
    (tmp_path / "docs.idx").write_text("")
    result = _evaluation(["EVAL_CHECKPOINTS=none", "EVAL_TP=1", "EVAL_RULER_CHAT=0",
                          f"EVAL_SHORT_DOCUMENTS={tmp_path / 'docs'}",
                          f"EVAL_LONG_DOCUMENTS={tmp_path / 'docs'}", "EVAL_POSITION_LENGTH=64",
                          *settings], default_hf=[f"hf={hf}"])
    assert result.command[:3] == ["py", "-m", "engine.evaluate"]
    assert result.check[3:6] == ["--check", "--world-size", "1"]
    expected = ["--no-progress", "--long-documents", str(tmp_path / "docs"),
                "--position-length", "64", "--short-documents", str(tmp_path / "docs"),
                "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                "parallel.context_parallel=1", "parallel.cp_algorithm=all-gather",
                "parallel.sequence_parallel=false"]
    assert result.command[-len(expected):] == expected
    assert "--chat-template" not in result.ruler[0] and "--tasks" not in result.command
    # Empty lists: the defaults, each item whole.
    result = _evaluation(["EVAL_CHECKPOINTS=", "EVAL_HF=none", "EVAL_RULER_TASKS=none",
                          *settings], default_checkpoints=[f"s1={runs['s1']}"])
    assert result.command[8:10] == ["--checkpoint", f"s1={runs['s1']}"] and not result.ruler


@pytest.mark.parametrize("args,message", [
    (["EVAL_CHECKPOINTS=x={tmp}/ckpt"],
     "EVAL_CHECKPOINTS: no engine checkpoint at {tmp}/ckpt ('x={tmp}/ckpt'; no 'latest' file)"),
    (["EVAL_HF={tmp}/ckpt/base"], "EVAL_HF: no Hugging Face model at {tmp}/ckpt/base"),
    (["EVAL_CHECKPOINTS=none", "EVAL_HF=none"], "EVAL_CHECKPOINTS and EVAL_HF are both none"),
    (["TOKENIZER="], "TOKENIZER is not set: the Llama-3 tokenizer"),
    (["TOKENIZER={tmp}/nothing"], "TOKENIZER={tmp}/nothing: no such file or folder"),
    (["EVAL_SHORT_DOCUMENTS={tmp}/docs"],
     "EVAL_SHORT_DOCUMENTS={tmp}/docs: no indexed dataset there (no {tmp}/docs.idx)"),
    (["EVAL_SAMPLES=0"], "EVAL_SAMPLES=0 must be an integer >= 1"),
    (["EVAL_GPUS=2", "EVAL_TP=4"], "EVAL_TP x EVAL_PP x EVAL_CP = 4 x 1 x 1 does not divide "
                                   "EVAL_GPUS=2"),
    (["EVAL_RULER_CHAT=2"], "EVAL_RULER_CHAT=2 must be 1 or 0"),
    (["EVAL_RULER_TASKS=vt niah_single"],
     "EVAL_RULER_TASKS: unknown RULER task 'niah_single'; choose from: niah_single_1"),
    (["EVAL_OUT={tmp}/ckpt"], "EVAL_OUT={tmp}/ckpt already exists; delete it or set EVAL_OUT"),
    (["EVAL_LENGTHS= "], "EVAL_LENGTHS is empty"),
    (["EVAL_LENGTHS=256 0"], "EVAL_LENGTHS=256 0: '0' is not a length in tokens"),
    (["EVAL_DEVICES=2"], "unknown launch setting EVAL_DEVICES"),
])
def test_a_bad_evaluation_setting_exits_2_naming_it_before_anything_runs(
        eval_inputs, tmp_path, capsys, args, message):
    runs, hf, settings = eval_inputs
    before = sorted(tmp_path.rglob("*"))
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    code = launch.main(["evaluate", "--name", "08.sh", "--default-checkpoint",
                        f"base={runs['base']}", "--default-hf", f"hf={hf}", *settings, *args])
    captured = capsys.readouterr()
    assert code == 2 and f"error: 08.sh: {message.format(tmp=tmp_path)}" in captured.err, (
        captured.err)
    assert "Traceback" not in captured.err and "engine.evaluate" not in captured.out
    assert sorted(tmp_path.rglob("*")) == before


def test_the_evaluation_defaults_are_the_full_size_recipes():
    """The settings' defaults here and in the stage script's table (TINY=0) are the same."""
    from engine.recipe.settings import stage_settings

    compared = []
    for setting in stage_settings("evaluate"):
        if setting.group == "evaluate" and "$" not in setting.default:
            assert launch.EVAL_SETTINGS[setting.name] == setting.default, setting.name
            compared.append(setting.name)
    assert len(compared) == 15, compared  # all but the paths under WORK


def test_the_evaluation_help_names_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for name, default in launch.EVAL_SETTINGS.items():
        assert f"{name}={default!r}" in help_text, name


# --- supervising torchrun: a stand-in "torchrun" whose one "training process" saves on SIGTERM

_STAND_IN = """\
import subprocess, sys
trainer = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
sys.exit(trainer.wait())
"""
_TRAINER = """\
import os, pathlib, signal, sys, time
run, save = sys.argv[1], sys.argv[2] == "save"
def stop(*_):
    print("SIGTERM received", flush=True)
    if save:
        pathlib.Path(run, "latest").write_text("step_00000004\\n")
    sys.exit(0 if save else 1)
signal.signal(signal.SIGTERM, stop)
for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS",
             "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
    print(f"{name}={os.environ.get(name, 'unset')}")
print("ready", flush=True)
time.sleep(60)
"""


def _settings(**given):
    settings, _ = launch.read_settings([f"{k}={v}" for k, v in given.items()], {})
    return settings


def _sigterm_when_ready(log, delay=0.0):
    """SIGTERM to this process (as `kill PID` sends it) once the trainer says it is ready."""
    import os
    import signal
    import threading
    import time

    def send():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and "ready" in log.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


@pytest.mark.parametrize("save", [True, False], ids=["checkpoint", "none"])
def test_sigterm_reaches_the_training_processes_and_the_stop_is_judged_by_the_checkpoint(
        tmp_path, capfd, save):
    import signal
    import sys

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "latest").write_text("step_00000002\n")
    log = run / "logs" / "node1.log"
    log.write_text("an earlier launch\n")
    sender = _sigterm_when_ready(log)
    command = [sys.executable, "-c", _STAND_IN, _TRAINER, str(run), "save" if save else "no"]
    status = launch.supervise(command, str(run), _settings(NNODES=2, NODE_RANK=1,
                              STOP_GRACE_S=60, SOCKET_IFNAME="lce0"), name="04.sh",
                              environ={"PATH": "/usr/bin:/bin"})
    sender.join()
    out = capfd.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    assert "== 04.sh: SIGTERM: asking the training processes to save a checkpoint and stop" in out
    # The trainer's output reaches the console and is appended to the node's log.
    text = log.read_text()
    assert text.startswith("an earlier launch\n") and "SIGTERM received" in text
    assert "SIGTERM received" in out
    for setting in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "OMP_NUM_THREADS=8",
                    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60", "GLOO_SOCKET_IFNAME=lce0",
                    "NCCL_SOCKET_IFNAME=lce0"):
        assert setting in text, setting
    if save:
        assert status == 0, out
        assert (f"== 04.sh: stopped by SIGTERM with checkpoint {run}/step_00000004; launch "
                "again (or resubmit) to resume from it") in out
    else:
        assert status == 1, out  # the trainer's exit 1, and no new checkpoint
        assert (f"== 04.sh: stopped by SIGTERM but no new checkpoint appeared in {run} "
                "(torchrun exit 1)") in out


def test_a_failed_run_names_the_lost_peers_of_this_launch_only(tmp_path, capfd):
    import sys

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    log = run / "logs" / "node0.log"
    log.write_text("Connection closed by peer [10.9.0.7]:4000\n")  # an earlier launch's
    failing = ("print('Connection closed by peer [10.9.0.2]:29400'); "
               "print('Read error [10.9.0.1]:1234: Connection reset by peer'); "
               "print('Read error [10.9.0.3]:1234: Connection reset by peer'); "
               "print('[10.9.0.4] said hello'); raise SystemExit(3)")
    status = launch.supervise([sys.executable, "-c", failing], str(run),
                              _settings(NNODES=4, LOCAL_ADDR="10.9.0.1"), name="04.sh")
    out = capfd.readouterr().out
    assert status == 3
    assert ("== 04.sh: lost node(s) 10.9.0.2,10.9.0.3: the connection to it closed (it died or "
            "was stopped) and training on node 0 stopped") in out
    assert (f"== 04.sh: training failed on node 0 of 4 (torchrun exit 3); the last checkpoint "
            f"is none in {run}, where a relaunch on every node resumes (log: {log})") in out
    assert launch.supervise([sys.executable, "-c", "print('fine')"], str(run),
                            _settings()) == 0
    assert "lost node" not in capfd.readouterr().out
