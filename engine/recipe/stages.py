"""The recipe's stages (examples/prolong/01-08) and the generic launcher (train_torchrun.sh): each
checks its inputs first -- a missing path or a bad value stops it (exit code 2, naming it)
before any process starts or anything is written -- then prints each command before it runs
it; with --check it prints them and runs nothing."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine import launch
from engine.recipe.settings import SettingError

TINY_TRAIN_CONFIG = "examples/prolong/tiny/train.yaml"
# Seconds between looks for node 0's packed SFT data.
_PACKED_POLL_S = 5


@dataclass
class Stage:
    """One run of a stage script: its settings, mode and engine.train overrides."""
    name: str  # the script, relative to the checkout (messages start with it)
    repo: str
    values: dict
    check: bool = False
    overrides: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        print(f"== {self.name}: {message}", flush=True)

    def show(self, command: list[str]) -> None:
        print(" ".join(map(launch.bash_quote, command)), flush=True)

    def run(self, command: list[str]) -> None:
        """Print ``command``; unless --check run it, stopping the stage with its exit status
        when it fails."""
        self.show(command)
        if not self.check:
            status = subprocess.run(command).returncode
            if status:
                raise SystemExit(status)

    # --- checks: each raises SettingError naming the setting and the fix ---

    def need_value(self, name: str, what: str) -> str:
        if not self.values.get(name):
            raise SettingError(f"{name} is not set: {what}. Set {name}=...")
        return self.values[name]

    def need_file(self, name: str, what: str) -> str:
        if not os.path.isfile(self.need_value(name, what)):
            raise SettingError(f"{name}={self.values[name]}: no such file ({what})")
        return self.values[name]

    def need_dir(self, name: str, what: str, fix: str = "") -> str:
        if not os.path.isdir(self.need_value(name, what)):
            raise SettingError(f"{name}={self.values[name]}: no such folder ({what})"
                               + (f"; {fix}" if fix else ""))
        return self.values[name]

    def need_path(self, name: str, what: str) -> str:
        if not os.path.exists(self.need_value(name, what)):
            raise SettingError(f"{name}={self.values[name]}: no such file or folder ({what})")
        return self.values[name]

    def need_int(self, name: str, minimum: int = 1) -> int:
        text = self.values.get(name, "")
        if not re.fullmatch(r"[0-9]+", text) or int(text) < minimum:
            raise SettingError(f"{name}={text} must be an integer >= {minimum}")
        return int(text)

    def need_lce_data(self, subcommand: str) -> None:
        found = shutil.which("lce-data")
        if not found:
            raise SettingError(f"the lce-data command is not installed: run 'pip install -e .' "
                               f"in {self.repo}")
        if subprocess.run(["lce-data", subcommand, "--help"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode:
            raise SettingError(f"'lce-data {subcommand}' is not available in this installation "
                               f"({found}); update the checkout and reinstall")


def need_packed(folder: str, maker: str) -> None:
    if not Path(folder, "packed.json").is_file():
        raise SettingError(f"no packed dataset at {folder} (no packed.json): run {maker} first")


def need_checkpoint(folder: str, maker: str) -> None:
    if not Path(folder, "latest").is_file():
        raise SettingError(f"no checkpoint at {folder} (no 'latest' file): run {maker} first")


# --- 01: the sources as indexed datasets ------------------------------------------------------

@dataclass
class Source:
    """One line of the source manifest."""
    name: str
    inputs: list[str]
    json_key: str  # "-": none
    group_by: str
    min_tokens: str


def read_manifest(manifest: str, raw_dir: str) -> list[Source]:
    """Every source of the manifest (source, comma-separated input patterns relative to
    ``raw_dir``, JSON key, group-by key, minimum tokens; '-' for none; '#' starts a comment),
    each pattern matched to its files; SettingError naming the line of the first bad one."""
    sources = []
    with open(manifest) as file:
        for number, line in enumerate(file, start=1):
            line = line.split("#", 1)[0]
            columns = line.split()
            if not columns:
                continue
            where = f"MANIFEST={manifest}:{number}"
            if len(columns) != 5:
                raise SettingError(f"{where}: expected 5 columns (source, inputs, json_key, "
                                   f"group_by, min_tokens; '-' for none), got: "
                                   f"{line.strip()}")
            name, patterns, key, group, min_tokens = columns
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
                raise SettingError(f"{where}: source name '{name}' must be letters, digits, "
                                   f"'.', '_' or '-'")
            if min_tokens != "-" and not re.fullmatch(r"[0-9]+", min_tokens):
                raise SettingError(f"{where}: min_tokens '{min_tokens}' must be a number or "
                                   f"'-'")
            inputs = []
            for pattern in patterns.split(","):
                if not pattern.startswith("/"):
                    pattern = f"{raw_dir}/{pattern}"
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise SettingError(f"{where}: '{pattern}' matches no file (source {name})")
                inputs += matches
            sources.append(Source(name, inputs, key, group, min_tokens))
    if not sources:
        raise SettingError(f"MANIFEST={manifest} lists no source")
    return sources


def _run_once(stage: Stage, prefix: str, command: list[str]) -> None:
    """Run ``command`` unless ``prefix``.idx (written last) already exists: a rerun continues
    where one stopped."""
    if Path(f"{prefix}.idx").is_file():
        stage.note(f"kept {prefix} (already built; delete {prefix}.* to build it again)")
        return
    if not stage.check:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    stage.run(command)


def data_roots(values: dict) -> tuple[str, str]:
    """Stage 1's and stage 2's tokenized sources: ProLong's released data keeps each download
    in its own folder (mix --data-root)."""
    if values["DATA_FROM"] == "prolong":
        return (f"{values['TOKENIZED_DIR']}/prolong-64K", f"{values['TOKENIZED_DIR']}/prolong-512K")
    return values["TOKENIZED_DIR"], values["TOKENIZED_DIR"]


def prepare_data(stage: Stage) -> None:
    values = stage.values
    if values["DATA_FROM"] == "raw":
        # The whole manifest is checked (every pattern matches a file) before any tokenizing.
        manifest = stage.need_file("MANIFEST", "the source manifest")
        raw_dir = stage.need_dir("RAW_DIR", "the raw data the manifest names")
        tokenizer = stage.need_path("TOKENIZER", "the Llama-3 tokenizer")
        stage.need_int("WORKERS")
        stage.need_lce_data("preprocess")
        for source in read_manifest(manifest, raw_dir):
            prefix = f"{values['TOKENIZED_DIR']}/{source.name}"
            command = ["lce-data", "preprocess", "--input", *source.inputs, "--output-prefix",
                       prefix, "--tokenizer", tokenizer, "--workers", values["WORKERS"],
                       "--quiet"]
            for option, value in (("--json-keys", source.json_key),
                                  ("--group-by", source.group_by),
                                  ("--min-tokens", source.min_tokens)):
                if value != "-":
                    command += [option, value]
            _run_once(stage, prefix, command)
        return
    downloads = {}
    for name, size in (("PROLONG_DATA_64K", "64K"), ("PROLONG_DATA_512K", "512K")):
        stage_number = 1 if size == "64K" else 2
        stage.need_value(name, f"the downloaded prolong-data-{size} folder (stage "
                               f"{stage_number}'s sources)")
        downloads[name] = stage.need_dir(name, f"the downloaded prolong-data-{size} folder")
    stage.need_lce_data("import-mds")
    jobs = []
    for download, root in zip(downloads.values(), data_roots(values)):
        folders = sorted(entry for entry in os.listdir(download)
                         if not entry.startswith(".") and os.path.isdir(f"{download}/{entry}"))
        if not folders:
            raise SettingError(f"{download} holds no source folder (expected e.g. "
                               f"book-65536/)")
        jobs += [(f"{download}/{folder}", f"{root}/{folder}") for folder in folders]
    for source, output in jobs:
        _run_once(stage, output, ["lce-data", "import-mds", source, "--output-prefix", output])


# --- 02: the packed mixtures ------------------------------------------------------------------

def build_mixtures(stage: Stage) -> None:
    values = stage.values
    stage.need_file("STAGE1_RECIPE", "the stage-1 mixture recipe")
    stage.need_file("STAGE2_RECIPE", "the stage-2 mixture recipe")
    roots = dict(zip(("STAGE1_DATA_ROOT", "STAGE2_DATA_ROOT"), data_roots(values)))
    checked = Stage(stage.name, stage.repo, roots)
    for number, name in ((1, "STAGE1_DATA_ROOT"), (2, "STAGE2_DATA_ROOT")):
        checked.need_dir(name, f"stage {number}'s tokenized sources",
                         "run examples/prolong/01_prepare_data.sh first")
    for name in ("STAGE1_CONFIG", "STAGE2_CONFIG"):
        if values[name] != "none":
            stage.need_file(name, "the stage's engine config")
    stage.need_lce_data("mix")
    for number, root in zip((1, 2), roots.values()):
        command = ["lce-data", "mix", values[f"STAGE{number}_RECIPE"], "--output",
                   f"{values['PACKED_DIR']}/stage{number}", "--data-root", root]
        if values[f"STAGE{number}_TOTAL_TOKENS"]:
            command += ["--total-tokens", values[f"STAGE{number}_TOTAL_TOKENS"]]
        if values[f"STAGE{number}_CONFIG"] != "none":
            command += ["--train-config", values[f"STAGE{number}_CONFIG"]]
        stage.run(command)


# --- 03: the Hugging Face model as an engine checkpoint ---------------------------------------

def import_model(stage: Stage) -> None:
    values = stage.values
    hf_model = values["HF_MODEL"]
    python = values["PYTHON"]
    if values["TINY"] == "1" and not os.path.exists(hf_model):
        tiny_model = launch.read_configs([f"{stage.repo}/{TINY_TRAIN_CONFIG}"]).model.name
        command = [python, f"{stage.repo}/examples/prolong/make_tiny_llama.py", "--model",
                   tiny_model, "--out", hf_model, "--tokenizer-dir",
                   os.path.dirname(values["TOKENIZER"])]
        if not stage.check:
            Path(hf_model).parent.mkdir(parents=True, exist_ok=True)
        stage.run(command)
    if not stage.check or values["TINY"] == "0":
        stage.need_dir("HF_MODEL", "the Hugging Face folder of Meta-Llama-3-8B-Instruct "
                                   "(config.json, *.safetensors)")
        if not Path(hf_model, "config.json").is_file():
            raise SettingError(f"HF_MODEL={hf_model} has no config.json: point it at a "
                               f"downloaded Hugging Face model folder")
    checkpoint = values["IMPORT_CKPT"]
    if Path(checkpoint, "latest").is_file():
        stage.note(f"kept {checkpoint} (already imported; delete it to import again)")
        return
    stage.run([python, "-m", "engine.convert", "import", "--hf", hf_model, "--out", checkpoint,
               "--rope-base", values["ROPE_BASE"], "--model-config-overrides",
               f"max_position_embeddings={values['MAX_POSITIONS']}"])


# --- 04, 05, 06, train_torchrun.sh: engine.train under torchrun on this node ------------------

def train(stage: Stage, configs: list[str], overrides: list[str] = (), *,
          unbuilt_seq_length: Optional[str] = None, layout_from_config: bool = False) -> int:
    """engine.launch reads the configs, checks the launch settings, resolves the layout (TP/PP/CP
    or the planner's), prints the torchrun command and, unless --check, runs it here: a SIGTERM
    to this process makes the trainer checkpoint and stop."""
    values = stage.values
    options = ["--name", stage.name, "--python", values["PYTHON"]]
    if unbuilt_seq_length:
        options += ["--unbuilt-seq-length", unbuilt_seq_length]
    if layout_from_config:
        options.append("--layout-from-config")
    if stage.check:
        options.append("--check")
    settings = [f"{name}={values[name]}" for name in launch.SETTINGS]
    if values["TINY"] == "1":
        # CPU processes: one thread each (engine.launch's default is 8).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    return launch.main([*options, *(arg for path in configs for arg in ("--config", path)),
                        *settings, *overrides, *stage.overrides])


def _stage_configs(stage: Stage) -> list[str]:
    """The stage's config, then (TINY=1) the tiny model's: every training stage of the recipe
    shrinks the same way."""
    configs = [stage.values["CONFIG"]]
    if stage.values["TINY"] == "1":
        configs.append(f"{stage.repo}/{TINY_TRAIN_CONFIG}")
    return configs


def _pretraining_stage(number: int, init_from: str, maker: str):
    """Stage 04 (number 1) or 05 (2): the stage's mixture, from ``init_from``'s checkpoint
    (``maker`` writes it)."""
    def run(stage: Stage) -> int:
        values = stage.values
        packed = f"{values['PACKED_DIR']}/stage{number}"
        need_packed(packed, "examples/prolong/02_build_mixtures.sh")
        need_checkpoint(values[init_from], maker)
        return train(stage, _stage_configs(stage), [
            f"data.path={packed}", f"checkpoint.dir={values[f'STAGE{number}_CKPT']}",
            f"checkpoint.init_from={values[init_from]}"])
    return run


train_stage1 = _pretraining_stage(1, "IMPORT_CKPT", "examples/prolong/03_import_model.sh")
train_stage2 = _pretraining_stage(2, "STAGE1_CKPT", "examples/prolong/04_train_stage1_64k.sh")


def sft(stage: Stage) -> int:
    """Packs SFT_DATA (node 0; the other nodes wait for its output), then trains."""
    values = stage.values
    configs = _stage_configs(stage)
    packed = f"{values['PACKED_DIR']}/sft"
    need_checkpoint(values["STAGE2_CKPT"], "examples/prolong/05_train_stage2_512k.sh")
    stage.need_int("SFT_SEQ_LENGTH")
    if Path(packed, "packed.json").is_file():
        stage.note(f"kept {packed} (already packed; delete it to pack again)")
    else:
        stage.need_value("SFT_DATA", "chat JSON lines to instruction-tune on (e.g. UltraChat)")
        tokenizer = stage.need_path("TOKENIZER", "the Llama-3 tokenizer")
        stage.need_lce_data("sft")
        inputs = []
        for pattern in values["SFT_DATA"].split():
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise SettingError(f"SFT_DATA: '{pattern}' matches no file")
            inputs += matches
        command = ["lce-data", "sft", "--input", *inputs, "--output", packed, "--tokenizer",
                   tokenizer, "--seq-length", values["SFT_SEQ_LENGTH"], "--overflow",
                   values["SFT_OVERFLOW"]]
        if values["NODE_RANK"] == "0":
            stage.run(command)
        else:
            stage.show(command)
            if not stage.check:
                _wait_for_packing(stage, packed)
    return train(stage, configs, [f"data.path={packed}", f"checkpoint.dir={values['SFT_CKPT']}",
                                  f"checkpoint.init_from={values['STAGE2_CKPT']}"],
                 unbuilt_seq_length=values["SFT_SEQ_LENGTH"])


def _wait_for_packing(stage: Stage, packed: str) -> None:
    """Wait for node 0's packed data (written under a temporary name, then renamed)."""
    timeout = stage.need_int("RDZV_TIMEOUT_S")
    waited = 0
    while not Path(packed, "packed.json").is_file():
        if waited >= timeout:
            raise SettingError(f"node 0 did not pack {packed} within RDZV_TIMEOUT_S={timeout} s")
        time.sleep(_PACKED_POLL_S)
        waited += _PACKED_POLL_S


def train_any(stage: Stage, config: str) -> int:
    """train_torchrun.sh: any config; the layout is its parallel section unless TP/PP/CP are
    set (PLAN_LAYOUT=1: the planner's)."""
    if stage.values["PLAN_LAYOUT"] not in ("0", "1"):
        raise SettingError(f"PLAN_LAYOUT={stage.values['PLAN_LAYOUT']} must be 0 or 1")
    return train(stage, [config], layout_from_config=stage.values["PLAN_LAYOUT"] != "1")


# --- 07: the Hugging Face export --------------------------------------------------------------

def export(stage: Stage) -> None:
    values = stage.values
    stage.need_dir("EXPORT_FROM", "the checkpoint to export", "run examples/prolong/06_sft.sh first")
    stage.need_dir("TOKENIZER_DIR", "the folder of the original model's tokenizer files")
    if values["EXPORT_STEP"]:
        stage.need_int("EXPORT_STEP", 0)
    if os.path.exists(values["HF_OUT"]):
        raise SettingError(f"HF_OUT={values['HF_OUT']} already exists; delete it or set HF_OUT "
                           f"to a new folder")
    command = [values["PYTHON"], "-m", "engine.convert", "export", "--checkpoint",
               values["EXPORT_FROM"], "--out", values["HF_OUT"], "--tokenizer",
               values["TOKENIZER_DIR"], "--dtype", values["EXPORT_DTYPE"]]
    if values["EXPORT_STEP"]:
        command += ["--step", values["EXPORT_STEP"]]
    stage.run(command)


# --- 08: every checkpoint and the export in one report ----------------------------------------

# The evaluation settings passed as resolved; the lists and the tokenizer are passed below.
EVAL_NAMES = tuple(name for name in launch.EVAL_SETTINGS
                   if name not in ("EVAL_CHECKPOINTS", "EVAL_HF", "TOKENIZER"))


def evaluate(stage: Stage, environ=os.environ) -> int:
    """engine.launch evaluate checks every setting (and runs engine.evaluate --check) before
    anything starts, prints the commands and, unless --check, runs them."""
    values = stage.values
    # Not given, the lists go over as their items (--default-*), so that paths under a WORK
    # holding spaces stay whole.
    settings = [f"EVAL_CHECKPOINTS={environ.get('EVAL_CHECKPOINTS', '')}",
                f"EVAL_HF={environ.get('EVAL_HF', '')}", f"TOKENIZER={values['TOKENIZER']}",
                *(f"{name}={values[name]}" for name in EVAL_NAMES)]
    options = ["--name", stage.name, "--python", values["PYTHON"]]
    for name, key in (("base", "IMPORT_CKPT"), ("stage1", "STAGE1_CKPT"),
                      ("stage2", "STAGE2_CKPT"), ("sft", "SFT_CKPT")):
        options += ["--default-checkpoint", f"{name}={values[key]}"]
    options += ["--default-hf", f"hf={values['HF_OUT']}"]
    if stage.check:
        options.append("--check")
    os.environ.setdefault("OMP_NUM_THREADS", "1" if values["TINY"] == "1" else "8")
    return launch.main(["evaluate", *options, *settings, *stage.overrides])


# Each stage: its function, and whether it takes section.key=value overrides.
STAGE_RUNNERS = {
    "prepare-data": (prepare_data, False),
    "build-mixtures": (build_mixtures, False),
    "import-model": (import_model, False),
    "train-stage1": (train_stage1, True),
    "train-stage2": (train_stage2, True),
    "sft": (sft, True),
    "export": (export, False),
    "evaluate": (evaluate, True),
}
