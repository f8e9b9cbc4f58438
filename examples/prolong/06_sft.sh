#!/usr/bin/env bash
# Stage 06: ProLong's instruction tuning -- short UltraChat-style chat data only (ProLong found
# adding synthetic long instructions hurt), loss on assistant tokens, from stage 2's weights
# (engine/configs/prolong-sft.yaml: 250 steps x 64 x 64K, lr 2e-5, 5% warm-up).
# Packs SFT_DATA first (`lce-data sft`, Llama-3 chat template; node 0 only), then trains.
#   SFT_DATA="ultrachat/*.jsonl" bash examples/prolong/06_sft.sh
# Each record is {"messages": [{"role": ..., "content": ...}, ...]}.
# Extra arguments are engine.train overrides (section.key=value).
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage sft "$@"
