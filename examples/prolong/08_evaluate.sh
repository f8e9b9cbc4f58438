#!/usr/bin/env bash
# Stage 08: evaluate the exported Hugging Face model (`python -m engine.evaluate`).
#   bash examples/prolong/08_evaluate.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
knobs_recipe_paths
EVAL_MODEL=${EVAL_MODEL:-$HF_OUT}           ## the Hugging Face folder (or engine checkpoint) to evaluate
EVAL_OUT=${EVAL_OUT:-$WORK/eval}            ## results folder
parse_args "$@"

need_path EVAL_MODEL "the model to evaluate"
"$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("engine.evaluate") is None)' ||
  die "the evaluation command 'python -m engine.evaluate' does not exist in this checkout ($REPO/engine/evaluate is missing), so EVAL_MODEL=$EVAL_MODEL cannot be evaluated here; the exported folder loads in any Hugging Face evaluation harness"
command=("$PYTHON" -m engine.evaluate --checkpoint "$EVAL_MODEL" --out "$EVAL_OUT")
printf '%q ' "${command[@]}"; printf '\n'
[ "$MODE" = check ] || "${command[@]}"
