# shellcheck shell=bash
# Shared by every launcher in examples/ (sourced, never run):
#   settings  -- environment variables, each with its default on its own line, listed by --help
#   checks    -- a missing path or a bad value stops the script (exit 2, naming it) before any
#                process group or GPU memory is touched
#   launch    -- `python -m engine.launch` reads the configs, checks the launch settings, takes
#                TP/PP/CP as given or the planner's layout, builds the torchrun command (c10d
#                rendezvous) and runs it: SIGTERM makes the trainer checkpoint and stop
# A setting line reads   NAME=${NAME:-default}  ## description
# Settings are read by the scripts that source this file:
# shellcheck disable=SC2034

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_PATH=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")
SCRIPT_NAME=${SCRIPT_PATH#"$REPO"/}
# The scripts run the engine of the checkout they live in, installed or not.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

_KNOB_FILES=("$SCRIPT_PATH")   # files whose setting lines --help lists
_KNOB_GROUPS=()                # setting groups of this file the script declared

die() {
  printf 'error: %s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

note() {
  printf '== %s: %s\n' "$SCRIPT_NAME" "$*"
}

# if_tiny TINY_VALUE FULL_VALUE: the default that depends on TINY=1.
if_tiny() {
  if [ "${TINY:-0}" = 1 ]; then printf '%s' "$1"; else printf '%s' "$2"; fi
}

TINY=${TINY:-0}                ## 1: a tiny model on the bundled sample data, on CPU, in minutes
PYTHON=${PYTHON:-python3}      ## the Python that runs the engine
[ "$TINY" = 0 ] || [ "$TINY" = 1 ] || die "TINY=$TINY must be 0 or 1"

# --- setting groups --------------------------------------------------------------------------

# Where the recipe reads and writes; every stage finds the previous one's output here.
knobs_recipe_paths() {
  _KNOB_GROUPS+=(knobs_recipe_paths)
  WORK=${WORK:-$(if_tiny runs/prolong-tiny runs/prolong)}             ## everything the recipe writes
  DATA_DIR=${DATA_DIR:-$WORK/data}                                     ## tokenized and packed data
  # raw: JSON lines you tokenize (01: MANIFEST); prolong: ProLong's released, tokenized data
  DATA_FROM=${DATA_FROM:-raw}                                          ## raw | prolong
  TOKENIZED_DIR=${TOKENIZED_DIR:-$DATA_DIR/tokenized}                  ## indexed datasets, one per source
  PACKED_DIR=${PACKED_DIR:-$DATA_DIR/packed}                           ## packed mixtures (02, 06)
  CKPT_ROOT=${CKPT_ROOT:-$WORK/checkpoints}                            ## engine checkpoints of every stage
  IMPORT_CKPT=${IMPORT_CKPT:-$CKPT_ROOT/llama3-8b-instruct}            ## 03's import of the HF model
  STAGE1_CKPT=${STAGE1_CKPT:-$CKPT_ROOT/prolong-stage1-64k}            ## 04's run directory
  STAGE2_CKPT=${STAGE2_CKPT:-$CKPT_ROOT/prolong-stage2-512k}           ## 05's run directory
  SFT_CKPT=${SFT_CKPT:-$CKPT_ROOT/prolong-sft}                         ## 06's run directory
  HF_MODEL=${HF_MODEL:-$(if_tiny "$WORK/hf-tiny-llama3" "")}           ## Meta-Llama-3-8B-Instruct folder (TINY=1: made by 03)
  HF_OUT=${HF_OUT:-$WORK/hf/prolong-8b-instruct}                       ## 07's Hugging Face export
  case $DATA_FROM in raw|prolong) ;; *) die "DATA_FROM=$DATA_FROM must be raw or prolong" ;; esac
  # ProLong's released data keeps each download in its own folder (mix --data-root).
  if [ "$DATA_FROM" = prolong ]; then
    STAGE1_DATA_ROOT=$TOKENIZED_DIR/prolong-64K
    STAGE2_DATA_ROOT=$TOKENIZED_DIR/prolong-512K
  else
    STAGE1_DATA_ROOT=$TOKENIZED_DIR
    STAGE2_DATA_ROOT=$TOKENIZED_DIR
  fi
}

# The Llama-3 tokenizer: a Hugging Face folder (tokenizer.json) or Llama-3's tokenizer.model.
knobs_tokenizer() {
  _KNOB_GROUPS+=(knobs_tokenizer)
  TOKENIZER=${TOKENIZER:-$(if_tiny "$(_offline_llama3_tokenizer)" "$HF_MODEL")}  ## Llama-3 tokenizer (folder or tokenizer.model)
}

_offline_llama3_tokenizer() {
  # The tests' offline copy of Llama-3's tokenizer (llama3.2-token-counter, installed by
  # examples/setup_env.sh); found without importing the package.
  "$PYTHON" -c "import importlib.util as u, os; s = u.find_spec('llama_token_counter'); \
print(os.path.join(s.submodule_search_locations[0], 'tokenizer', 'tokenizer.model') if s else '')"
}

# How the training processes are launched on this node.
knobs_launch() {
  _KNOB_GROUPS+=(knobs_launch)
  NNODES=${NNODES:-1}                          ## nodes in the job
  NODE_RANK=${NODE_RANK:-0}                    ## this node, 0..NNODES-1 (node 0 hosts the rendezvous)
  MASTER_ADDR=${MASTER_ADDR:-localhost}        ## address of node 0, reachable from every node
  MASTER_PORT=${MASTER_PORT:-29500}            ## rendezvous port on node 0
  GPUS_PER_NODE=${GPUS_PER_NODE:-$(if_tiny 2 8)} ## training processes per node (TINY=1: CPU processes)
  GPU_MEMORY_GB=${GPU_MEMORY_GB:-$(if_tiny 4 80)} ## memory per GPU, for the planner
  TP=${TP:-}                                   ## tensor parallel (TP, PP, CP empty: the planner's layout)
  PP=${PP:-}                                   ## pipeline parallel
  CP=${CP:-}                                   ## context parallel
  CP_ALGORITHM=${CP_ALGORITHM:-}               ## all-gather | ulysses (empty: the planner's / config's)
  RECOMPUTE=${RECOMPUTE:-}                     ## none | selective | full (empty: the planner's / config's)
  GLOBAL_BATCH=${GLOBAL_BATCH:-}               ## sequences per step (empty: the config's)
  MICRO_BATCH=${MICRO_BATCH:-}                 ## sequences per micro-batch (empty: the config's)
  TRAIN_STEPS=${TRAIN_STEPS:-}                 ## optimizer steps (empty: the config's)
  LR=${LR:-}                                   ## peak learning rate (empty: the config's)
  SAVE_INTERVAL=${SAVE_INTERVAL:-}             ## steps between checkpoints (empty: the config's)
  RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-longctx}} ## rendezvous id, the same on every node of a job
  RDZV_TIMEOUT_S=${RDZV_TIMEOUT_S:-900}        ## seconds to wait for all nodes to join
  LOCAL_ADDR=${LOCAL_ADDR:-}                   ## this node's address for the others (empty: its hostname)
  SOCKET_IFNAME=${SOCKET_IFNAME:-}             ## network interface for gloo/NCCL (empty: their choice)
  STOP_GRACE_S=${STOP_GRACE_S:-240}            ## seconds after SIGTERM for the checkpoint before SIGKILL
  DRY_RUN=${DRY_RUN:-$(if_tiny 0 1)}           ## 1: --check also runs one step of the run on no GPU (engine.train --dry-run)
}

# --- arguments and help ----------------------------------------------------------------------

# parse_args [--allow-overrides] "$@": sets MODE (run | check) and OVERRIDES (section.key=value).
parse_args() {
  local allow_overrides=0
  if [ "${1:-}" = --allow-overrides ]; then allow_overrides=1; shift; fi
  MODE=run
  OVERRIDES=()
  local arg
  for arg in "$@"; do
    case $arg in
      -h|--help) usage; exit 0 ;;
      --check) MODE=check ;;
      *=*)
        [ "$allow_overrides" = 1 ] || die "unexpected argument '$arg': settings are environment variables (see --help)"
        OVERRIDES+=("$arg") ;;
      *) die "unknown argument '$arg' (--help lists the settings)" ;;
    esac
  done
}

usage() {
  # The script's header comment, then each setting with its value, description and default.
  sed -n '2,/^[^#]/{/^#/!d;/^# shellcheck/d;s/^# \{0,1\}//;p}' "$SCRIPT_PATH"
  printf '\nOptions: --help (this), --check (validate and print the commands, run nothing)\n'
  printf 'Settings (environment variables), each with its current value, meaning and default:\n'
  _print_knobs "$SCRIPT_PATH" ""
  local group
  for group in "${_KNOB_GROUPS[@]}"; do
    _print_knobs "${BASH_SOURCE[0]}" "$group"
  done
  _print_knobs "${BASH_SOURCE[0]}" top
}

# _print_knobs FILE GROUP: setting lines of FILE (GROUP: inside that function; top: outside
# any function; empty: all).
_print_knobs() {
  local file=$1 group=$2 line inside="" re
  re='^[[:space:]]*([A-Z][A-Z0-9_]*)=\$\{[A-Z][A-Z0-9_]*:-(.*)\}[[:space:]]+## (.*)$'
  while IFS= read -r line; do
    case $line in
      [a-z_]*"() {"*) inside=${line%%()*} ;;
      "}") inside="" ;;
    esac
    if [ -n "$group" ] && { { [ "$group" = top ] && [ -n "$inside" ]; } ||
                            { [ "$group" != top ] && [ "$inside" != "$group" ]; }; }; then
      continue
    fi
    if [[ $line =~ $re ]]; then
      local name=${BASH_REMATCH[1]}
      printf '  %s\n        %s [default: %s]\n' "$name=${!name-}" "${BASH_REMATCH[3]}" "${BASH_REMATCH[2]}"
    fi
  done < "$file"
}

# --- checks ----------------------------------------------------------------------------------

need_value() {  # need_value NAME WHAT
  [ -n "${!1-}" ] || die "$1 is not set: $2. Set $1=..."
}

need_file() {   # need_file NAME WHAT
  need_value "$1" "$2"
  [ -f "${!1}" ] || die "$1=${!1}: no such file ($2)"
}

need_dir() {    # need_dir NAME WHAT [FIX]
  need_value "$1" "$2"
  [ -d "${!1}" ] || die "$1=${!1}: no such folder ($2)${3:+; $3}"
}

need_path() {   # need_path NAME WHAT: a file or a folder
  need_value "$1" "$2"
  [ -e "${!1}" ] || die "$1=${!1}: no such file or folder ($2)"
}

need_int() {    # need_int NAME [MIN]: an integer >= MIN (default 1)
  if ! [[ ${!1-} =~ ^[0-9]+$ ]] || [ "${!1}" -lt "${2:-1}" ]; then
    die "$1=${!1-} must be an integer >= ${2:-1}"
  fi
}

need_packed() {  # need_packed DIR MAKER: a packed dataset (lce-data mix / sft output)
  [ -f "$1/packed.json" ] || die "no packed dataset at $1 (no packed.json): run $2 first"
}

need_checkpoint() {  # need_checkpoint DIR MAKER: an engine checkpoint root with a latest step
  [ -f "$1/latest" ] || die "no checkpoint at $1 (no 'latest' file): run $2 first"
}

need_lce_data() {  # need_lce_data [SUBCOMMAND]
  command -v lce-data > /dev/null ||
    die "the lce-data command is not installed: run 'pip install -e .' in $REPO"
  if [ -n "${1:-}" ]; then
    lce-data "$1" --help > /dev/null 2>&1 ||
      die "'lce-data $1' is not available in this installation ($(command -v lce-data)); update the checkout and reinstall"
  fi
}

# --- launch ----------------------------------------------------------------------------------

# recipe_stage_configs CONFIG: the stage's config, then (TINY=1) the tiny model's, into
# STAGE_CONFIGS: every training stage of the recipe shrinks the same way.
recipe_stage_configs() {
  STAGE_CONFIGS=("$1")
  [ "$TINY" = 0 ] || STAGE_CONFIGS+=("$REPO/examples/prolong/tiny/train.yaml")
}

# train_stage [--unbuilt-seq-length N] [--layout-from-config] CONFIG... -- OVERRIDE...:
# engine.launch reads the configs, checks the launch settings, resolves the layout (TP/PP/CP
# or the planner's) and prints the torchrun command; MODE=run then runs it on this node, in
# this process: a SIGTERM to the script makes the trainer checkpoint and stop (N: the packing
# length of data not built yet, for --check).
train_stage() {
  local options=() configs=() name
  while [ $# -gt 0 ] && [[ $1 = --* ]] && [ "$1" != -- ]; do
    options+=("$1")
    [ "$1" != --unbuilt-seq-length ] || { options+=("$2"); shift; }
    shift
  done
  while [ $# -gt 0 ] && [ "$1" != -- ]; do configs+=(--config "$1"); shift; done
  [ $# -eq 0 ] || shift
  [ "$MODE" = run ] || options+=(--check)
  local settings=()
  for name in NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE GPU_MEMORY_GB TP PP CP \
              CP_ALGORITHM RECOMPUTE GLOBAL_BATCH MICRO_BATCH TRAIN_STEPS LR SAVE_INTERVAL \
              RDZV_ID RDZV_TIMEOUT_S LOCAL_ADDR SOCKET_IFNAME STOP_GRACE_S DRY_RUN; do
    settings+=("$name=${!name}")
  done
  # TINY=1 trains on CPU processes: one thread each (engine.launch's default is 8).
  [ "$TINY" = 0 ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec "$PYTHON" -m engine.launch --name "$SCRIPT_NAME" --python "$PYTHON" "${options[@]}" \
    "${configs[@]}" "${settings[@]}" "$@" "${OVERRIDES[@]}"
}
