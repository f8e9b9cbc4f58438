#!/usr/bin/env bash
# Stage 08: every stage's checkpoint side by side -- the imported base, stage 1, stage 2, SFT --
# and the Hugging Face export, in one report (`python -m engine.evaluate`): recall at
# EVAL_LENGTHS (RULER/HELMET formats, teacher-forced in the engine, greedy generation through
# transformers for the export), loss by position over long held-out documents and the loss of
# short ones. Writes EVAL_OUT/report.json, report.md and PNG plots. The engine checkpoints are
# evaluated under torchrun on this node in the EVAL_TP x EVAL_PP x EVAL_CP layout, the export
# by rank 0 afterwards. For HELMET's other categories (RAG, re-rank, ICL, QA, summarization) run
# HELMET on HF_OUT (README, Long-context evaluation).
#   bash examples/prolong/08_evaluate.sh
#   EVAL_LONG_DOCUMENTS=data/books-heldout EVAL_POSITION_LENGTH=131072 bash examples/prolong/08_evaluate.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
knobs_recipe_paths
knobs_tokenizer
# The defaults are kept as lists too: paths under a WORK holding spaces stay whole.
default_checkpoints=("base=$IMPORT_CKPT" "stage1=$STAGE1_CKPT" "stage2=$STAGE2_CKPT" "sft=$SFT_CKPT")
default_hf=("hf=$HF_OUT")
EVAL_CHECKPOINTS_SET=${EVAL_CHECKPOINTS:+1}
EVAL_HF_SET=${EVAL_HF:+1}
EVAL_CHECKPOINTS=${EVAL_CHECKPOINTS:-base=$IMPORT_CKPT stage1=$STAGE1_CKPT stage2=$STAGE2_CKPT sft=$SFT_CKPT}  ## engine checkpoints, NAME=PATH separated by spaces, or by newlines where a path holds spaces (none: no engine checkpoint)
EVAL_HF=${EVAL_HF:-hf=$HF_OUT}                          ## Hugging Face folders, NAME=FOLDER separated like EVAL_CHECKPOINTS (none: no folder)
EVAL_LENGTHS=${EVAL_LENGTHS:-$(if_tiny "256 512" "32768 65536 131072")}  ## recall prompt lengths in tokens (HELMET: 32K/64K development, 128K final)
EVAL_DEPTHS=${EVAL_DEPTHS:-$(if_tiny 1 5)}              ## needle depths: a count swept over 0..1, or fractions
EVAL_TASKS=${EVAL_TASKS:-all}                           ## recall tasks, space-separated (all: the six of engine.evaluate)
EVAL_SAMPLES=${EVAL_SAMPLES:-1}                         ## examples per (task, length, depth)
EVAL_LONG_DOCUMENTS=${EVAL_LONG_DOCUMENTS:-$(if_tiny "$TOKENIZED_DIR/code-repos" none)}  ## held-out long documents (indexed dataset prefix) for loss by position (none: skip)
EVAL_POSITION_LENGTH=${EVAL_POSITION_LENGTH:-$(if_tiny 512 131072)}  ## tokens of each long document the loss by position covers
EVAL_SHORT_DOCUMENTS=${EVAL_SHORT_DOCUMENTS:-$(if_tiny "$TOKENIZED_DIR/docs" none)}  ## held-out short documents (indexed dataset prefix): did short-context ability survive (none: skip)
EVAL_GPUS=${EVAL_GPUS:-$(if_tiny 2 8)}                  ## processes on this node for the engine checkpoints
EVAL_TP=${EVAL_TP:-$(if_tiny 2 8)}                      ## tensor parallel of the evaluation (DP: what EVAL_GPUS leaves)
EVAL_PP=${EVAL_PP:-1}                                   ## pipeline parallel of the evaluation
EVAL_CP=${EVAL_CP:-1}                                   ## context parallel of the evaluation (512K prompts: raise it)
EVAL_CP_ALGORITHM=${EVAL_CP_ALGORITHM:-all-gather}      ## all-gather | ulysses
EVAL_OUT=${EVAL_OUT:-$WORK/eval}                        ## results folder
parse_args --allow-overrides "$@"

# _items NAME: the list setting NAME's items, into `items`: one a line where it holds several
# lines, else separated by spaces.
_items() {
  items=()
  [ "${!1}" != none ] || return 0
  if [[ ${!1} == *$'\n'* ]]; then
    mapfile -t items <<< "${!1}"
  else
    read -r -a items <<< "${!1}"
  fi
}

# Engine checkpoints and HF folders: every one must exist before anything starts.
targets=() checkpoints=() hf_folders=()
if [ -n "$EVAL_CHECKPOINTS_SET" ]; then _items EVAL_CHECKPOINTS; checkpoints=("${items[@]}")
else checkpoints=("${default_checkpoints[@]}"); fi
for item in "${checkpoints[@]}"; do
  path=${item#*=}
  [ -f "$path/latest" ] || [ -f "$path/engine_state.json" ] ||
    die "EVAL_CHECKPOINTS: no engine checkpoint at $path ('$item'; no 'latest' file): run its stage first or leave it out of EVAL_CHECKPOINTS"
  targets+=(--checkpoint "$item")
done
if [ -n "$EVAL_HF_SET" ]; then _items EVAL_HF; hf_folders=("${items[@]}")
else hf_folders=("${default_hf[@]}"); fi
for item in "${hf_folders[@]}"; do
  path=${item#*=}
  [ -f "$path/config.json" ] ||
    die "EVAL_HF: no Hugging Face model at $path ('$item'; no config.json): run examples/prolong/07_export_hf.sh first or set EVAL_HF=none"
  targets+=(--hf "$item")
done
[ "${#targets[@]}" -gt 0 ] || die "EVAL_CHECKPOINTS and EVAL_HF are both none: nothing to evaluate"
need_path TOKENIZER "the Llama-3 tokenizer the recall prompts are made with"
for name in EVAL_LONG_DOCUMENTS EVAL_SHORT_DOCUMENTS; do
  [ "${!name}" = none ] || [ -f "${!name}.idx" ] ||
    die "$name=${!name}: no indexed dataset there (no ${!name}.idx); tokenize one with lce-data preprocess, or set $name=none to skip it"
done
for name in EVAL_SAMPLES EVAL_POSITION_LENGTH EVAL_GPUS EVAL_TP EVAL_PP EVAL_CP; do
  need_int "$name"
done
((EVAL_GPUS % (EVAL_TP * EVAL_PP * EVAL_CP) == 0)) ||
  die "EVAL_TP x EVAL_PP x EVAL_CP = $EVAL_TP x $EVAL_PP x $EVAL_CP does not divide EVAL_GPUS=$EVAL_GPUS"
[ ! -e "$EVAL_OUT" ] || die "EVAL_OUT=$EVAL_OUT already exists; delete it or set EVAL_OUT to a new folder"

read -r -a lengths <<< "$EVAL_LENGTHS"
[ "${#lengths[@]}" -gt 0 ] || die "EVAL_LENGTHS is empty: give prompt lengths in tokens, e.g. 32768 65536"
for length in "${lengths[@]}"; do
  [[ $length =~ ^[1-9][0-9]*$ ]] ||
    die "EVAL_LENGTHS=$EVAL_LENGTHS: '$length' is not a length in tokens (a whole number >= 1)"
done
read -r -a depths <<< "$EVAL_DEPTHS"
args=("${targets[@]}" --tokenizer "$TOKENIZER" --lengths "${lengths[@]}" --depths "${depths[@]}"
      --samples "$EVAL_SAMPLES" --out "$EVAL_OUT" --no-progress)
if [ "$EVAL_TASKS" != all ]; then
  read -r -a tasks <<< "$EVAL_TASKS"
  args+=(--tasks "${tasks[@]}")
fi
[ "$EVAL_LONG_DOCUMENTS" = none ] ||
  args+=(--long-documents "$EVAL_LONG_DOCUMENTS" --position-length "$EVAL_POSITION_LENGTH")
[ "$EVAL_SHORT_DOCUMENTS" = none ] || args+=(--short-documents "$EVAL_SHORT_DOCUMENTS")
args+=(parallel.tensor_parallel="$EVAL_TP" parallel.pipeline_parallel="$EVAL_PP"
       parallel.context_parallel="$EVAL_CP" parallel.cp_algorithm="$EVAL_CP_ALGORITHM"
       parallel.sequence_parallel="$([ "$EVAL_TP" -gt 1 ] && echo true || echo false)"
       "${OVERRIDES[@]}")
if [ "${#checkpoints[@]}" -gt 0 ]; then
  command=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$EVAL_GPUS"
           -m engine.evaluate "${args[@]}")
else
  command=("$PYTHON" -m engine.evaluate "${args[@]}")  # Hugging Face folders only: one process
fi
# engine.evaluate's own checks (tasks, lengths, depths, tokenizer, checkpoints, --out, layout)
# in one process: a refused evaluation stops here, before torchrun starts anything.
check_world=1
[ "${#checkpoints[@]}" -eq 0 ] || check_world=$EVAL_GPUS
"$PYTHON" -m engine.evaluate --check --world-size "$check_world" "${args[@]}" ||
  die "engine.evaluate refused the evaluation (the error above); nothing was launched"
printf '%q ' "${command[@]}"; printf '\n'
[ "$MODE" = run ] || exit 0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(if_tiny 1 8)}
mkdir -p "$(dirname "$EVAL_OUT")"
"${command[@]}"
note "report: $EVAL_OUT/report.md"
