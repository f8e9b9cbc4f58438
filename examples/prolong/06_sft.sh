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
knobs_recipe_paths
knobs_tokenizer
knobs_launch
SFT_DATA=${SFT_DATA:-$(if_tiny "$REPO/data_tools/sample/chat.jsonl" "")}  ## chat JSON lines (space-separated files or globs)
SFT_SEQ_LENGTH=${SFT_SEQ_LENGTH:-$(if_tiny 512 65536)}  ## SFT packing length in tokens (ProLong: 64K)
SFT_OVERFLOW=${SFT_OVERFLOW:-drop}          ## a conversation that does not fit: drop (ProLong) | move
CONFIG=${CONFIG:-$REPO/engine/configs/prolong-sft.yaml}  ## the stage's engine.train config
parse_args --allow-overrides "$@"

recipe_stage_configs "$CONFIG"
SFT_PACKED="$PACKED_DIR/sft"
need_checkpoint "$STAGE2_CKPT" examples/prolong/05_train_stage2_512k.sh
need_int SFT_SEQ_LENGTH
if [ -f "$SFT_PACKED/packed.json" ]; then
  note "kept $SFT_PACKED (already packed; delete it to pack again)"
else
  need_value SFT_DATA "chat JSON lines to instruction-tune on (e.g. UltraChat)"
  need_path TOKENIZER "the Llama-3 tokenizer"
  need_lce_data sft
  # Unquoted on purpose: SFT_DATA holds files or globs.
  # shellcheck disable=SC2206
  sft_inputs=($SFT_DATA)
  for input in "${sft_inputs[@]}"; do
    [ -e "$input" ] || die "SFT_DATA: '$input' matches no file"
  done
  command=(lce-data sft --input "${sft_inputs[@]}" --output "$SFT_PACKED" --tokenizer "$TOKENIZER"
           --seq-length "$SFT_SEQ_LENGTH" --overflow "$SFT_OVERFLOW")
  printf '%q ' "${command[@]}"; printf '\n'
  if [ "$MODE" = run ] && [ "${NODE_RANK:-0}" = 0 ]; then
    "${command[@]}"
  elif [ "$MODE" = run ]; then
    # Other nodes wait for node 0's packed data (written under a temporary name, then renamed).
    waited=0
    until [ -f "$SFT_PACKED/packed.json" ]; do
      [ "$waited" -lt "$RDZV_TIMEOUT_S" ] || die "node 0 did not pack $SFT_PACKED within RDZV_TIMEOUT_S=$RDZV_TIMEOUT_S s"
      sleep 5; waited=$((waited + 5))
    done
  fi
fi
train_stage --unbuilt-seq-length "$SFT_SEQ_LENGTH" "${STAGE_CONFIGS[@]}" -- data.path="$SFT_PACKED" checkpoint.dir="$SFT_CKPT" \
  checkpoint.init_from="$STAGE2_CKPT"
