#!/usr/bin/env bash
# Stage 02: the packed stage-1 (64K) and stage-2 (512K) mixtures (`lce-data mix`), from the
# sources 01 wrote. Mixing is cached: an unchanged recipe over unchanged sources is reused.
#   bash examples/prolong/02_build_mixtures.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
knobs_recipe_paths
RECIPES="$REPO/data_tools/recipes"
TINY_DIR="$REPO/examples/prolong/tiny"
# ProLong's released data has its own recipes (sources named by the release's folders).
STAGE1_RECIPE=${STAGE1_RECIPE:-$(if_tiny "$TINY_DIR/mix-stage1.yaml" "$RECIPES/prolong-stage1-64k$([ "$DATA_FROM" = raw ] && echo -raw).yaml")}  ## stage-1 mixture recipe
STAGE2_RECIPE=${STAGE2_RECIPE:-$(if_tiny "$TINY_DIR/mix-stage2.yaml" "$RECIPES/prolong-stage2-512k$([ "$DATA_FROM" = raw ] && echo -raw).yaml")}  ## stage-2 mixture recipe
STAGE1_TOTAL_TOKENS=${STAGE1_TOTAL_TOKENS:-}   ## tokens to draw for stage 1 (empty: the recipe's)
STAGE2_TOTAL_TOKENS=${STAGE2_TOTAL_TOKENS:-}   ## tokens to draw for stage 2 (empty: the recipe's)
# The stage's engine config (the CONFIG of 04/05): the mixture draws its train_steps x
# data.global_batch sequences, and a recipe smaller than that is refused. TINY=1 keeps the tiny
# recipes' own size (the stage configs' step counts are the full run's).
STAGE1_CONFIG=${STAGE1_CONFIG:-$(if_tiny none "$REPO/engine/configs/prolong-stage1-64k.yaml")}  ## stage 1's engine config (none: the recipe's size alone)
STAGE2_CONFIG=${STAGE2_CONFIG:-$(if_tiny none "$REPO/engine/configs/prolong-stage2-512k.yaml")}  ## stage 2's engine config (none: the recipe's size alone)
parse_args "$@"

need_file STAGE1_RECIPE "the stage-1 mixture recipe"
need_file STAGE2_RECIPE "the stage-2 mixture recipe"
need_dir STAGE1_DATA_ROOT "stage 1's tokenized sources" "run examples/prolong/01_prepare_data.sh first"
need_dir STAGE2_DATA_ROOT "stage 2's tokenized sources" "run examples/prolong/01_prepare_data.sh first"
for name in STAGE1_CONFIG STAGE2_CONFIG; do
  [ "${!name}" = none ] || need_file "$name" "the stage's engine config"
done
need_lce_data mix

for stage in 1 2; do
  recipe_var=STAGE${stage}_RECIPE root_var=STAGE${stage}_DATA_ROOT tokens_var=STAGE${stage}_TOTAL_TOKENS
  config_var=STAGE${stage}_CONFIG
  command=(lce-data mix "${!recipe_var}" --output "$PACKED_DIR/stage$stage" --data-root "${!root_var}")
  [ -z "${!tokens_var}" ] || command+=(--total-tokens "${!tokens_var}")
  [ "${!config_var}" = none ] || command+=(--train-config "${!config_var}")
  printf '%q ' "${command[@]}"; printf '\n'
  [ "$MODE" = check ] || "${command[@]}"
done
