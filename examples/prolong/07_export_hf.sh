#!/usr/bin/env bash
# Stage 07: the instruction-tuned checkpoint -> a Hugging Face LlamaForCausalLM folder (bf16
# safetensors, config.json with the trained RoPE base, the tokenizer files of TOKENIZER_DIR)
# (`python -m engine.convert export`; reads any TP/PP/CP layout, one tensor at a time).
#   bash examples/prolong/07_export_hf.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage export "$@"
