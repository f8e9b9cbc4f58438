#!/usr/bin/env bash
# Stage 03: Llama-3-8B-Instruct from Hugging Face -> an engine checkpoint to continue from,
# with ProLong's stage-1 RoPE base (8e6; Llama-3 ships 5e5) (`python -m engine.convert import`).
# TINY=1 first writes a small random LlamaForCausalLM with Llama-3's vocabulary into HF_MODEL
# and imports it the same way.
#   HF_MODEL=/models/Meta-Llama-3-8B-Instruct bash examples/prolong/03_import_model.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
knobs_recipe_paths
knobs_tokenizer
ROPE_BASE=${ROPE_BASE:-8e6}                 ## RoPE base to continue with (ProLong stage 1: 8e6)
MAX_POSITIONS=${MAX_POSITIONS:-65536}       ## max_position_embeddings recorded in the checkpoint
parse_args "$@"

if [ "$TINY" = 1 ] && [ ! -e "$HF_MODEL" ]; then
  tiny_model=$("$PYTHON" -m engine.launch --get model.name --config "$REPO/examples/prolong/tiny/train.yaml")
  command=("$PYTHON" "$REPO/examples/prolong/make_tiny_llama.py" --model "$tiny_model"
           --out "$HF_MODEL" --tokenizer-dir "$(dirname "$TOKENIZER")")
  printf '%q ' "${command[@]}"; printf '\n'
  if [ "$MODE" = run ]; then mkdir -p "$(dirname "$HF_MODEL")"; "${command[@]}"; fi
fi
if [ "$MODE" = run ] || [ "$TINY" = 0 ]; then
  need_dir HF_MODEL "the Hugging Face folder of Meta-Llama-3-8B-Instruct (config.json, *.safetensors)"
  [ -f "$HF_MODEL/config.json" ] || die "HF_MODEL=$HF_MODEL has no config.json: point it at a downloaded Hugging Face model folder"
fi
command=("$PYTHON" -m engine.convert import --hf "$HF_MODEL" --out "$IMPORT_CKPT"
         --rope-base "$ROPE_BASE" --model-config-overrides "max_position_embeddings=$MAX_POSITIONS")
if [ -f "$IMPORT_CKPT/latest" ]; then
  note "kept $IMPORT_CKPT (already imported; delete it to import again)"
  exit 0
fi
printf '%q ' "${command[@]}"; printf '\n'
[ "$MODE" = check ] || "${command[@]}"
