"""Launch engine.train under torchrun on this node (c10d rendezvous): read the configs with the
engine's loader, take the layout as set (TP/PP/CP) or the one the planner recommends, check
the launch settings, print the torchrun command, and with --check run the trainer's one-process
checks (and DRY_RUN=1: one step on the meta device) instead of launching.

  python -m engine.launch --config engine/configs/prolong-stage1-64k.yaml --check \\
      NNODES=8 GPU_MEMORY_GB=80 data.path=runs/packed checkpoint.dir=runs/stage1

Launch settings are NAME=value arguments or, when not given, environment variables of the
same name (the scripts in examples/ pass theirs; `bash examples/train_torchrun.sh --help`
describes each). section.key=value arguments are engine.train overrides and come last on its
command line, so they win. A bad setting or config stops with exit code 2 naming it, before
anything starts.

Without --check the torchrun command runs here, supervised: its output is also appended to
CHECKPOINT_DIR/logs/nodeNODE_RANK.log; a SIGTERM to this process is passed to the training
processes, which save a checkpoint and stop (exit 0 when a new checkpoint appeared, else
non-zero); a failed run names the nodes whose connection broke and where it resumes.

The evaluation stage (examples/prolong/08_evaluate.sh): `python -m engine.launch evaluate --help`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.model.config import MODEL_CONFIGS, get_model_config
from engine.parallel.layout import CP_ALGORITHMS, RECOMPUTE_MODES
from engine.planner.__main__ import layout_overrides
from engine.planner.memory import Workload
from engine.planner.plan import plan_layouts
from engine.recipe.settings import SETTINGS as RECIPE_SETTINGS
from engine.training.config import ConfigError, TrainConfig, load_config, read_config_file


def _defaults(group: str) -> dict:
    """{name: default} of the examples' settings table (engine.recipe.settings) for ``group``,
    as this launch takes them when called directly: a default that names a recipe path ($WORK,
    ...) or is computed is empty here ("": unset, the config's, the planner's or the caller's
    choice)."""
    return {s.name: "" if callable(s.default) or "$" in s.default else s.default
            for s in RECIPE_SETTINGS if s.group == group}


# Each launch setting with its default. DRY_RUN differs from the scripts' full-size default:
# called directly, --check stays the trainer's one-process check unless DRY_RUN=1 asks for more.
SETTINGS = dict(_defaults("launch"), DRY_RUN="0")
# Settings that set the layout's engine.train keys (TP/PP/CP empty: the planner's layout or,
# for train_torchrun.sh, the config's).
LAYOUT_SETTINGS = {"TP": "parallel.tensor_parallel", "PP": "parallel.pipeline_parallel",
                   "CP": "parallel.context_parallel", "CP_ALGORITHM": "parallel.cp_algorithm",
                   "RECOMPUTE": "parallel.recompute"}
# Empty settings that set an engine.train key when given.
TRAIN_SETTINGS = {"GLOBAL_BATCH": "data.global_batch", "MICRO_BATCH": "data.micro_batch",
                  "TRAIN_STEPS": "train_steps", "LR": "optimizer.lr",
                  "SAVE_INTERVAL": "checkpoint.save_interval"}
_SETTING_ARG = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$", re.S)


class LaunchSettingError(ValueError):
    """A launch setting or config the launch cannot go on with (exit code 2)."""


@dataclass
class Launch:
    """What the launch resolved: the torchrun command and where its run writes."""
    command: list[str]
    train_args: list[str]  # engine.train's arguments (configs, layout, settings, overrides)
    world_size: int
    checkpoint_dir: str
    notes: list[str]


def _choices(values) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


def _integer(settings: dict, name: str, minimum: int = 1) -> int:
    text = settings[name]
    if not text.isdigit() or int(text) < minimum:
        raise LaunchSettingError(f"{name}={text} must be an integer >= {minimum}")
    return int(text)


def _apply_named(args: list[str], settings: dict) -> tuple[dict, list[str]]:
    """(``settings`` with the NAME=value arguments among ``args`` applied, the section.key=value
    overrides among them); a NAME that is not one of ``settings`` is refused."""
    overrides = []
    for arg in args:
        match = _SETTING_ARG.match(arg)
        if match and match.group(1) in settings:
            settings[match.group(1)] = match.group(2)
        elif match:
            raise LaunchSettingError(f"unknown launch setting {match.group(1)}; the settings "
                                     f"are {', '.join(settings)}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise LaunchSettingError(f"unexpected argument {arg!r}: give section.key=value "
                                     f"overrides or NAME=value launch settings (--help)")
    return settings, overrides


def read_settings(args: list[str], environ=os.environ) -> tuple[dict, list[str]]:
    """(launch settings, engine.train overrides) from NAME=value / section.key=value arguments;
    a setting not among the arguments comes from the environment, else its default."""
    settings = {name: environ.get(name, default) for name, default in SETTINGS.items()}
    if not settings["RDZV_ID"]:
        settings["RDZV_ID"] = environ.get("SLURM_JOB_ID", "longctx")
    return _apply_named(args, settings)


def _last_override(key: str, overrides: list[str]) -> Optional[str]:
    values = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == key]
    return values[-1] if values else None


def read_configs(paths: list[str]) -> TrainConfig:
    """The configs merged by the engine's loader; a file that is missing, not YAML or not a
    mapping is named (LaunchSettingError)."""
    try:
        for path in paths:
            if not isinstance(read_config_file(path), dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
        return load_config(paths)
    except ConfigError as error:
        raise LaunchSettingError(str(error)) from None


def planner_layout(model: str, seq_length: int, gpus: int, gpu_memory_gb: float,
                   global_batch: int, micro_batch: int,
                   cp_algorithm: str = "") -> tuple[list[str], str]:
    """(the planner's recommended layout as engine.train overrides, the equivalent planner
    command), or LaunchSettingError when none fits."""
    command = ["python", "-m", "engine.planner", "--model", model, "--seq-length",
               str(seq_length), "--gpus", str(gpus), "--gpu-memory-gb", f"{gpu_memory_gb:g}",
               "--global-batch", str(global_batch), "--micro-batch", str(micro_batch)]
    if cp_algorithm:
        command += ["--cp-algorithm", cp_algorithm]
    why = ""
    if model not in MODEL_CONFIGS:
        why = f"unknown model {model!r}; the planner knows {', '.join(sorted(MODEL_CONFIGS))}"
    elif gpus & (gpus - 1):
        why = f"{gpus} GPUs: the planner enumerates powers of two"
    else:
        algorithms = (cp_algorithm,) if cp_algorithm else CP_ALGORITHMS
        fitting, _ = plan_layouts(get_model_config(model), Workload(seq_length, micro_batch),
                                  gpus, gpu_memory_gb, algorithms, global_batch)
        if fitting:
            return layout_overrides(fitting[0].layout).split(), shlex.join(command)
        why = f"no layout fits (`{shlex.join(command)}` shows the closest)"
    raise LaunchSettingError(
        f"the planner found no layout for {model} at {seq_length} tokens on {gpus} x "
        f"{gpu_memory_gb:g} GB ({why}); set TP, PP and CP yourself or change NNODES, "
        f"GPUS_PER_NODE, GPU_MEMORY_GB")


def resolve_layout(settings: dict, config: TrainConfig, seq_length: int,
                   layout_from_config: bool) -> tuple[list[str], str]:
    """(engine.train layout overrides, where the layout came from) for NNODES x GPUS_PER_NODE
    processes: TP/PP/CP as set (layout_from_config and none set: the config's), else the
    planner's; CP_ALGORITHM and RECOMPUTE, when set, win over both."""
    gpus = int(settings["NNODES"]) * int(settings["GPUS_PER_NODE"])
    for name, choices in (("RECOMPUTE", RECOMPUTE_MODES), ("CP_ALGORITHM", CP_ALGORITHMS)):
        if settings[name] and settings[name] not in choices:
            raise LaunchSettingError(f"{name}={settings[name]} must be {_choices(choices)}")
    given = {name: settings[name] for name in ("TP", "PP", "CP")}
    if not any(given.values()) and layout_from_config:
        parallel = config.parallel
        given = {"TP": str(parallel.tensor_parallel), "PP": str(parallel.pipeline_parallel),
                 "CP": str(parallel.context_parallel)}
    if any(given.values()):
        for name, text in given.items():
            if text:
                _integer(given, name)
        tp, pp, cp = (int(given[name] or 1) for name in ("TP", "PP", "CP"))
        if gpus % (tp * pp * cp):
            raise LaunchSettingError(f"TP x PP x CP = {tp} x {pp} x {cp} does not divide "
                                     f"NNODES x GPUS_PER_NODE = {gpus} processes")
        layout = [f"{LAYOUT_SETTINGS[name]}={value}"
                  for name, value in (("TP", tp), ("PP", pp), ("CP", cp))]
        if tp == 1:
            # Sequence parallelism splits activations over the TP group; without TP it does
            # not exist.
            layout.append("parallel.sequence_parallel=false")
        source = f"as set (TP={tp} PP={pp} CP={cp})"
    else:
        try:
            memory = float(settings["GPU_MEMORY_GB"])
        except ValueError:
            raise LaunchSettingError(f"GPU_MEMORY_GB={settings['GPU_MEMORY_GB']} must be a "
                                     f"number of GB") from None
        global_batch = int(settings["GLOBAL_BATCH"] or config.data.global_batch)
        micro_batch = int(settings["MICRO_BATCH"] or config.data.micro_batch)
        layout, command = planner_layout(config.model.name, seq_length, gpus, memory,
                                         global_batch, micro_batch, settings["CP_ALGORITHM"])
        source = f"recommended by: {command}"
    layout += [f"{LAYOUT_SETTINGS[name]}={settings[name]}"
               for name in ("CP_ALGORITHM", "RECOMPUTE") if settings[name]]
    return layout, source


def plan_launch(configs: list[str], settings: dict, overrides: list[str], *, check: bool,
                unbuilt_seq_length: Optional[int] = None, layout_from_config: bool = False,
                python: str = sys.executable) -> Launch:
    """Check everything the launch needs and build the torchrun command (LaunchSettingError
    naming what is wrong)."""
    config = read_configs(configs)
    nnodes = _integer(settings, "NNODES")
    node_rank = _integer(settings, "NODE_RANK", 0)
    gpus_per_node = _integer(settings, "GPUS_PER_NODE")
    for name in ("MASTER_PORT", "RDZV_TIMEOUT_S"):
        _integer(settings, name)
    _integer(settings, "STOP_GRACE_S", 0)
    if not settings["MASTER_ADDR"]:
        raise LaunchSettingError("MASTER_ADDR is not set: the address of node 0. Set "
                                 "MASTER_ADDR=...")
    if node_rank >= nnodes:
        raise LaunchSettingError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    for name in TRAIN_SETTINGS:
        if settings[name] and name != "LR":
            _integer(settings, name, 0)
    for name in ("DRY_RUN", "VERBOSE"):
        if settings[name] not in ("0", "1"):
            raise LaunchSettingError(f"{name}={settings[name]} must be 0 or 1")

    data_path = _last_override("data.path", overrides) or config.data.path
    checkpoint_dir = _last_override("checkpoint.dir", overrides) or config.checkpoint.dir
    if not checkpoint_dir:
        raise LaunchSettingError("checkpoint.dir is not set: the run's folder; set it in the "
                                 "config or give checkpoint.dir=...")
    packed = Path(data_path) / "packed.json"
    if data_path and packed.is_file():
        seq_length = int(json.loads(packed.read_text())["seq_length"])
    elif check and unbuilt_seq_length:
        seq_length = unbuilt_seq_length
    else:
        raise LaunchSettingError(f"no packed dataset at data.path={data_path} (no packed.json): "
                                 f"build it with lce-data mix / sft")
    layout, source = resolve_layout(settings, config, seq_length, layout_from_config)

    train_settings = [f"{key}={settings[name]}" for name, key in TRAIN_SETTINGS.items()
                      if settings[name]]
    train_args = [arg for path in configs for arg in ("--config", path)]
    # Overrides last: they win over the settings.
    train_args += [*layout, *train_settings, *overrides]
    command = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank",
               str(node_rank), "--nproc-per-node", str(gpus_per_node),
               "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{settings['MASTER_ADDR']}:{settings['MASTER_PORT']}",
               "--rdzv-id", settings["RDZV_ID"],
               # Node 0 hosts the rendezvous store: said outright, since matching MASTER_ADDR
               # against this host's names fails where a node has several (ProLong users hit
               # rendezvous time-outs), and a long timeout lets slow nodes join.
               "--rdzv-conf",
               f"timeout={settings['RDZV_TIMEOUT_S']},is_host={str(node_rank == 0).lower()}",
               "--max-restarts", "0"]
    if settings["LOCAL_ADDR"]:
        command += ["--local-addr", settings["LOCAL_ADDR"]]
    # The training run only: the checks before it have no resolved config to print.
    verbose = ["--verbose"] if settings["VERBOSE"] == "1" else []
    command += ["-m", "engine.train", *verbose, *train_args]
    notes = [f"node {node_rank} of {nnodes}, {gpus_per_node} processes per node; layout "
             f"{' '.join(layout)}", f"layout {source}"]
    return Launch(command, train_args, nnodes * gpus_per_node, checkpoint_dir, notes)


# --- supervising torchrun on this node -----------------------------------------------------

_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]")


def _latest(checkpoint_dir: str) -> str:
    path = Path(checkpoint_dir, "latest")
    return path.read_text().strip() if path.is_file() else ""


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _own_addresses(local_addr: str) -> set[str]:
    try:
        listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
    except OSError:
        listed = ""
    return {local_addr, *listed.split()} - {""}


def lost_peers(log: Path, offset: int, local_addr: str = "") -> list[str]:
    """Other nodes' addresses whose connection broke, from ``log`` after byte ``offset`` (gloo:
    "Connection closed by peer [ADDR]:PORT", "Read error [ADDR]:PORT: Connection reset by
    peer"; NCCL words it differently and is not parsed). This node's own addresses are left
    out: its other processes also lose the connection to the first one that failed."""
    with open(log, "rb") as file:
        file.seek(offset)
        text = file.read().decode(errors="replace")
    found = {address for line in text.splitlines() if "by peer" in line
             for address in _PEER_ADDRESS.findall(line)}
    return sorted(found - _own_addresses(local_addr))


def torchrun_environment(settings: dict, environ=os.environ) -> dict:
    """The environment torchrun and the trainer run in."""
    env = dict(environ)
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # NCCL: keeps TP communication ordered with compute
    env.setdefault("OMP_NUM_THREADS", "8")
    # torchrun's wait for its processes after a SIGTERM, before SIGKILL: the checkpoint's time.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = settings["STOP_GRACE_S"]
    if settings["SOCKET_IFNAME"]:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = settings["SOCKET_IFNAME"]
    return env


def _tee(source, log: Path) -> None:
    """Copy ``source`` (torchrun's output) to this process's stdout and to ``log`` as it
    comes."""
    out = sys.stdout.buffer
    with open(log, "ab") as file:
        while chunk := os.read(source.fileno(), 65536):
            for sink in (out, file):
                sink.write(chunk)
                sink.flush()


def supervise(command: list[str], checkpoint_dir: str, settings: dict,
              name: str = "engine.launch", environ=os.environ) -> int:
    """Run torchrun's ``command`` to its end; its exit status, judged by the checkpoint a stop
    left.

    The trainer saves a checkpoint and exits 0 on SIGTERM. A SIGTERM sent to this process alone
    (kill PID) is passed to the training processes; under SLURM every process of the step gets
    it at once, torchrun included, which then waits STOP_GRACE_S for them before SIGKILL (and
    exits 1 whatever they did), so a stop is judged by the checkpoint it left."""
    def note(message: str) -> None:
        print(f"== {name}: {message}", flush=True)

    latest_before = _latest(checkpoint_dir)
    # Each node keeps its console output beside the checkpoints (appended across launches).
    logs = Path(checkpoint_dir, "logs")
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"node{settings['NODE_RANK']}.log"
    log_start = log.stat().st_size if log.is_file() else 0
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=torchrun_environment(settings, environ))
    # The copy is a thread of this process, not a process of its own: a SIGTERM to every
    # process of the step (SLURM) cannot end it while the trainer prints during its save.
    tee = threading.Thread(target=_tee, args=(process.stdout, log), daemon=True)
    tee.start()
    stop_requested = False

    def forward_sigterm(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True
        note("SIGTERM: asking the training processes to save a checkpoint and stop")
        # torchrun's processes, not torchrun: it would stop them its own way and exit 1.
        for child in _children(process.pid):
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        while True:
            try:
                status = process.wait()
                break
            except KeyboardInterrupt:
                continue  # Ctrl-C reached torchrun too: it stops its processes, then exits
    finally:
        signal.signal(signal.SIGTERM, previous)
    # The log is complete before it is read below (a process torchrun left behind that still
    # holds the output is not waited for long).
    tee.join(timeout=30)
    if status < 0:
        status = 128 - status  # killed by a signal: the shell's way of saying so
    latest_after = _latest(checkpoint_dir)
    if stop_requested:
        if latest_after and latest_after != latest_before:
            note(f"stopped by SIGTERM with checkpoint {checkpoint_dir}/{latest_after}; launch "
                 f"again (or resubmit) to resume from it")
            return 0
        note(f"stopped by SIGTERM but no new checkpoint appeared in {checkpoint_dir} "
             f"(torchrun exit {status})")
        return status or 1
    if status:
        lost = lost_peers(log, log_start, settings["LOCAL_ADDR"])
        if lost:
            note(f"lost node(s) {','.join(lost)}: the connection to it closed (it died or was "
                 f"stopped) and training on node {settings['NODE_RANK']} stopped")
        note(f"training failed on node {settings['NODE_RANK']} of {settings['NNODES']} "
             f"(torchrun exit {status}); the last checkpoint is {latest_after or 'none'} in "
             f"{checkpoint_dir}, where a relaunch on every node resumes (log: {log})")
    return status


# --- the evaluation stage: every checkpoint of the recipe and its export in one report ------

# Each evaluation setting with its default (the full-size recipe's; "": to be given). An empty
# EVAL_CHECKPOINTS or EVAL_HF means the caller's defaults (--default-checkpoint, --default-hf).
EVAL_SETTINGS = dict(_defaults("evaluate"), TOKENIZER="")


@dataclass
class Evaluation:
    """What the evaluation launch resolved: engine.evaluate's command, the one-process check of
    the same arguments, and RULER's protocol on each Hugging Face folder."""
    command: list[str]
    check: list[str]
    ruler: list[list[str]]
    out: str


def read_eval_settings(args: list[str], environ=os.environ) -> tuple[dict, list[str]]:
    """(evaluation settings, engine.evaluate overrides), as read_settings reads the launch's."""
    return _apply_named(args, {name: environ.get(name, default)
                               for name, default in EVAL_SETTINGS.items()})


def _items(value: str, default: list[str]) -> list[str]:
    """A list setting's items: one a line where it holds several lines (paths holding spaces),
    else separated by spaces; none: no item; empty: ``default``."""
    if not value:
        return list(default)
    if value == "none":
        return []
    if "\n" in value:
        return [line for line in value.split("\n") if line]
    return value.split()


def _unset(name: str, what: str) -> LaunchSettingError:
    return LaunchSettingError(f"{name} is not set: {what}. Set {name}=...")


def plan_evaluation(settings: dict, overrides: list[str], default_checkpoints=(),
                    default_hf=(), python: str = sys.executable) -> Evaluation:
    """Check every evaluation setting and build the commands (LaunchSettingError naming what is
    wrong); every engine checkpoint and Hugging Face folder must exist before anything starts."""
    checkpoints = _items(settings["EVAL_CHECKPOINTS"], default_checkpoints)
    hf_folders = _items(settings["EVAL_HF"], default_hf)
    targets = []
    for item in checkpoints:
        path = item.split("=", 1)[-1]
        if not (Path(path, "latest").is_file() or Path(path, "engine_state.json").is_file()):
            raise LaunchSettingError(
                f"EVAL_CHECKPOINTS: no engine checkpoint at {path} ('{item}'; no 'latest' "
                f"file): run its stage first or leave it out of EVAL_CHECKPOINTS")
        targets += ["--checkpoint", item]
    for item in hf_folders:
        path = item.split("=", 1)[-1]
        if not Path(path, "config.json").is_file():
            raise LaunchSettingError(
                f"EVAL_HF: no Hugging Face model at {path} ('{item}'; no config.json): run "
                f"examples/prolong/07_export_hf.sh first or set EVAL_HF=none")
        targets += ["--hf", item]
    if not targets:
        raise LaunchSettingError("EVAL_CHECKPOINTS and EVAL_HF are both none: nothing to "
                                 "evaluate")
    tokenizer = settings["TOKENIZER"]
    what = "the Llama-3 tokenizer the recall prompts are made with"
    if not tokenizer:
        raise _unset("TOKENIZER", what)
    if not Path(tokenizer).exists():
        raise LaunchSettingError(f"TOKENIZER={tokenizer}: no such file or folder ({what})")
    for name in ("EVAL_LONG_DOCUMENTS", "EVAL_SHORT_DOCUMENTS"):
        prefix = settings[name]
        if prefix != "none" and not Path(f"{prefix}.idx").is_file():
            raise LaunchSettingError(
                f"{name}={prefix}: no indexed dataset there (no {prefix}.idx); tokenize one "
                f"with lce-data preprocess, or set {name}=none to skip it")
    for name in ("EVAL_SAMPLES", "EVAL_RULER_SAMPLES", "EVAL_POSITION_LENGTH", "EVAL_GPUS",
                 "EVAL_TP", "EVAL_PP", "EVAL_CP"):
        _integer(settings, name)
    gpus, tp, pp, cp = (int(settings[f"EVAL_{name}"]) for name in ("GPUS", "TP", "PP", "CP"))
    if gpus % (tp * pp * cp):
        raise LaunchSettingError(f"EVAL_TP x EVAL_PP x EVAL_CP = {tp} x {pp} x {cp} does not "
                                 f"divide EVAL_GPUS={gpus}")
    ruler_tasks = _items(settings["EVAL_RULER_TASKS"], [])
    if settings["EVAL_RULER_TASKS"] != "none":
        if settings["EVAL_RULER_CHAT"] not in ("1", "0"):
            raise LaunchSettingError(f"EVAL_RULER_CHAT={settings['EVAL_RULER_CHAT']} must be 1 "
                                     f"or 0")
        # A misspelt task fails now, not after the engine checkpoints' evaluation.
        from engine.evaluate.ruler import RULER_TASKS
        for task in ruler_tasks:
            if task not in RULER_TASKS:
                raise LaunchSettingError(f"EVAL_RULER_TASKS: unknown RULER task '{task}'; "
                                         f"choose from: {' '.join(RULER_TASKS)} (or none)")
    out = settings["EVAL_OUT"]
    if not out:
        raise _unset("EVAL_OUT", "the results folder")
    if os.path.exists(out):
        raise LaunchSettingError(f"EVAL_OUT={out} already exists; delete it or set EVAL_OUT "
                                 f"to a new folder")
    lengths = settings["EVAL_LENGTHS"].split()
    if not lengths:
        raise LaunchSettingError("EVAL_LENGTHS is empty: give prompt lengths in tokens, e.g. "
                                 "32768 65536")
    for length in lengths:
        if not re.fullmatch(r"[1-9][0-9]*", length):
            raise LaunchSettingError(f"EVAL_LENGTHS={settings['EVAL_LENGTHS']}: '{length}' is "
                                     f"not a length in tokens (a whole number >= 1)")

    args = [*targets, "--tokenizer", tokenizer, "--lengths", *lengths,
            "--depths", *settings["EVAL_DEPTHS"].split(), "--samples", settings["EVAL_SAMPLES"]]
    if settings["EVAL_TASKS"] != "all":
        # Before a flag: a list option last would take the overrides for tasks.
        args += ["--tasks", *settings["EVAL_TASKS"].split()]
    args += ["--out", out, "--no-progress"]
    if settings["EVAL_LONG_DOCUMENTS"] != "none":
        args += ["--long-documents", settings["EVAL_LONG_DOCUMENTS"],
                 "--position-length", settings["EVAL_POSITION_LENGTH"]]
    if settings["EVAL_SHORT_DOCUMENTS"] != "none":
        args += ["--short-documents", settings["EVAL_SHORT_DOCUMENTS"]]
    args += [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
             f"parallel.context_parallel={cp}",
             f"parallel.cp_algorithm={settings['EVAL_CP_ALGORITHM']}",
             f"parallel.sequence_parallel={str(tp > 1).lower()}", *overrides]
    evaluate = [python, "-m", "engine.evaluate"]
    if checkpoints:
        command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(gpus), "-m", "engine.evaluate", *args]
    else:
        command = [*evaluate, *args]  # Hugging Face folders only: one process
    check = [*evaluate, "--check", "--world-size", str(gpus if checkpoints else 1), *args]
    # RULER's own protocol on each Hugging Face folder, for tables beside RULER's published
    # ones.
    chat = ["--chat-template"] if settings["EVAL_RULER_CHAT"] == "1" else []
    ruler = [[*evaluate, "--protocol", "ruler", "--hf", item.split("=", 1)[-1],
              "--tokenizer", tokenizer, "--tasks", *ruler_tasks, "--lengths", *lengths,
              "--samples", settings["EVAL_RULER_SAMPLES"], *chat,
              "--out", f"{out}/ruler-{item.split('=', 1)[0]}"]
             for item in (hf_folders if ruler_tasks else [])]
    return Evaluation(command, check, ruler, out)


def evaluate_main(argv: list[str]) -> int:
    """``python -m engine.launch evaluate``: the evaluation stage's checks and commands."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.launch evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Evaluate engine checkpoints (under torchrun --standalone on this node) and Hugging Face folders
(afterwards, in one process) side by side with engine.evaluate, then run RULER's protocol on
each folder. Every setting is checked, and engine.evaluate --check run in one process, before
anything starts: a bad one stops with exit code 2 naming it.

  python -m engine.launch evaluate --check EVAL_CHECKPOINTS=stage1=runs/stage1 EVAL_HF=none \\
      TOKENIZER=Meta-Llama-3-8B EVAL_OUT=runs/eval EVAL_GPUS=8 EVAL_TP=4""",
        epilog=textwrap.fill("Settings (NAME=value arguments, else environment variables; bash "
               "examples/prolong/08_evaluate.sh --help describes each) and their defaults: "
               + ", ".join(f"{name}={default!r}" for name, default in EVAL_SETTINGS.items())
               + ". EVAL_CHECKPOINTS and EVAL_HF hold NAME=PATH items separated by spaces, or "
                 "by newlines where a path holds spaces; none: no item; empty: the defaults.", 96))
    parser.add_argument("arguments", nargs="*", metavar="NAME=value | section.key=value",
                        help="evaluation settings and engine.evaluate overrides")
    parser.add_argument("--check", action="store_true",
                        help="check, print the commands and run engine.evaluate --check; "
                             "launch nothing")
    parser.add_argument("--default-checkpoint", action="append", default=[],
                        metavar="NAME=PATH", help="an engine checkpoint an empty "
                        "EVAL_CHECKPOINTS means (repeat for several)")
    parser.add_argument("--default-hf", action="append", default=[], metavar="NAME=FOLDER",
                        help="a Hugging Face folder an empty EVAL_HF means (repeat for several)")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python of the launched processes (default: this one)")
    parser.add_argument("--name", default="engine.launch evaluate",
                        help="the name its messages start with (the calling script's)")
    args = parser.parse_args(argv)

    def die(message: str) -> int:
        print(f"error: {args.name}: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        settings, overrides = read_eval_settings(args.arguments)
        evaluation = plan_evaluation(settings, overrides, args.default_checkpoint,
                                     args.default_hf, args.python)
    except LaunchSettingError as error:
        return die(str(error))
    # engine.evaluate's own checks (tasks, lengths, depths, tokenizer, checkpoints, --out,
    # layout) in one process: a refused evaluation stops here, before torchrun starts anything.
    # torchrun --standalone picks a free port of its own: a MASTER_PORT of the environment
    # (taken or not) is none of the evaluation's business.
    environ = {name: value for name, value in os.environ.items() if name != "MASTER_PORT"}
    if subprocess.run(evaluation.check, env=environ).returncode:
        return die("engine.evaluate refused the evaluation (the error above); nothing was "
                   "launched")
    for command in (evaluation.command, *evaluation.ruler):
        print(" ".join(map(bash_quote, command)), flush=True)
    if args.check:
        return 0
    Path(evaluation.out).parent.mkdir(parents=True, exist_ok=True)
    for command in (evaluation.command, *evaluation.ruler):
        status = subprocess.run(command).returncode
        if status:
            return status
    print(f"== {args.name}: report: {evaluation.out}/report.md", flush=True)
    print(f"== {args.name}: HELMET and lm-eval's RULER on an export, offline too: "
          f"docs/evaluation.md, The full benchmarks", flush=True)
    return 0


def bash_quote(arg: str) -> str:
    """``arg`` as bash's printf %q quotes it: a plain path or setting as it is, other printable
    text with each special character escaped (a path holding a space stays one word that
    still ends in its own last characters), anything else in single quotes."""
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    if arg and arg.isprintable():
        return re.sub(r"([^\w@%+=:,./-])", r"\\\1", arg)
    return shlex.quote(arg)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m engine.launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Launch settings and their defaults: " + ", ".join(
            f"{name}={default}" for name, default in SETTINGS.items())
        + " (RDZV_ID: SLURM_JOB_ID, else longctx)")
    parser.add_argument("--config", action="append", required=True,
                        help="engine.train YAML config; several are merged in order")
    parser.add_argument("arguments", nargs="*", metavar="NAME=value | section.key=value",
                        help="launch settings and engine.train overrides")
    parser.add_argument("--check", action="store_true",
                        help="check and print the command, then run engine.train --check "
                             "(DRY_RUN=1: also its --dry-run) instead of launching")
    parser.add_argument("--layout-from-config", action="store_true",
                        help="TP, PP and CP unset: the config's parallel section rather than "
                             "the planner's layout")
    parser.add_argument("--unbuilt-seq-length", type=int,
                        help="with --check: the packing length of data not built yet")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python of the launched processes (default: this one)")
    parser.add_argument("--name", default="engine.launch",
                        help="the name its messages start with (the calling script's)")
    parser.add_argument("--get", metavar="SECTION.KEY",
                        help="print this key of the merged configs (as engine.train reads "
                             "them) and exit")
    args = parser.parse_args(argv)

    def die(message: str) -> int:
        print(f"error: {args.name}: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        if args.get:
            value = read_configs(args.config).to_dict()
            for key in args.get.split("."):
                if not isinstance(value, dict) or key not in value:
                    raise LaunchSettingError(f"{args.get} is not a config key")
                value = value[key]
            print(value)
            return 0
        settings, overrides = read_settings(args.arguments)
        launch = plan_launch(args.config, settings, overrides, check=args.check,
                             unbuilt_seq_length=args.unbuilt_seq_length,
                             layout_from_config=args.layout_from_config, python=args.python)
    except LaunchSettingError as error:
        return die(str(error))
    for note in launch.notes:
        print(f"== {args.name}: {note}")
    print(" ".join(map(bash_quote, launch.command)), flush=True)
    engine_train = [args.python, "-m", "engine.train"]
    world = ["--world-size", str(launch.world_size)]
    if args.check and settings["DRY_RUN"] == "1":
        # One training step of this very run, as the first rank of the first and of the last
        # pipeline stage, on the meta device (seconds of CPU a rank): a shape, layout or
        # host/device error stops here, before any GPU is asked for.
        if subprocess.run([*engine_train, "--dry-run", *world, *launch.train_args]).returncode:
            return die("the dry run failed (the error above): a GPU run of these settings "
                       "would fail there")
    if args.check:
        return 0
    # The trainer's own checks (config, data, layout, checkpoints) in one process first: a
    # refused run stops here with one message, before torchrun starts any process. Its port
    # check is of the rendezvous port torchrun will listen on (node 0, MASTER_ADDR here).
    rendezvous = dict(os.environ, MASTER_ADDR=settings["MASTER_ADDR"],
                      MASTER_PORT=settings["MASTER_PORT"])
    if subprocess.run([*engine_train, "--check", *world, *launch.train_args],
                      env=rendezvous).returncode:
        return die("engine.train refused the run (the error above); nothing was launched")
    return supervise(launch.command, launch.checkpoint_dir, settings, args.name)


if __name__ == "__main__":
    sys.exit(main())
