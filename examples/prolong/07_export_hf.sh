#!/usr/bin/env bash
# Stage 07: the instruction-tuned checkpoint -> a Hugging Face LlamaForCausalLM folder (bf16
# safetensors, config.json with the trained RoPE base, the tokenizer files of TOKENIZER_DIR)
# (`python -m engine.convert export`; reads any TP/PP/CP layout, one tensor at a time).
#   bash examples/prolong/07_export_hf.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
knobs_recipe_paths
EXPORT_FROM=${EXPORT_FROM:-$SFT_CKPT}       ## checkpoint root (its latest step) or a step_* folder
EXPORT_STEP=${EXPORT_STEP:-}                ## export this step of EXPORT_FROM (empty: latest)
TOKENIZER_DIR=${TOKENIZER_DIR:-$HF_MODEL}   ## folder whose tokenizer files go along (the original model)
EXPORT_DTYPE=${EXPORT_DTYPE:-bfloat16}      ## bfloat16 | float16 | float32
parse_args "$@"

need_dir EXPORT_FROM "the checkpoint to export" "run examples/prolong/06_sft.sh first"
need_dir TOKENIZER_DIR "the folder of the original model's tokenizer files"
[ -z "$EXPORT_STEP" ] || need_int EXPORT_STEP 0
[ ! -e "$HF_OUT" ] || die "HF_OUT=$HF_OUT already exists; delete it or set HF_OUT to a new folder"
command=("$PYTHON" -m engine.convert export --checkpoint "$EXPORT_FROM" --out "$HF_OUT"
         --tokenizer "$TOKENIZER_DIR" --dtype "$EXPORT_DTYPE")
[ -z "$EXPORT_STEP" ] || command+=(--step "$EXPORT_STEP")
printf '%q ' "${command[@]}"; printf '\n'
[ "$MODE" = check ] || "${command[@]}"
