#!/usr/bin/env bash
# Stage 03: Llama-3-8B-Instruct from Hugging Face -> an engine checkpoint to continue from,
# with ProLong's stage-1 RoPE base (8e6; Llama-3 ships 5e5) (`python -m engine.convert import`).
# TINY=1 first writes a small random LlamaForCausalLM with Llama-3's vocabulary into HF_MODEL
# and imports it the same way.
#   HF_MODEL=/models/Meta-Llama-3-8B-Instruct bash examples/prolong/03_import_model.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage import-model "$@"
