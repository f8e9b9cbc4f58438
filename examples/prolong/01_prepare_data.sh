#!/usr/bin/env bash
# Stage 01: the training sources as indexed datasets, one per source.
#   DATA_FROM=raw (default): tokenize your JSON lines / Parquet / text folders with the Llama-3
#     tokenizer, one source per line of MANIFEST (`lce-data preprocess`).
#   DATA_FROM=prolong: import ProLong's released, already tokenized data (one folder per source
#     of prolong-data-64K and prolong-data-512K; `lce-data import-mds`).
# A source whose output already exists is kept, so a rerun continues where one stopped.
#   bash examples/prolong/01_prepare_data.sh
#   DATA_FROM=prolong PROLONG_DATA_64K=/data/prolong-data-64K PROLONG_DATA_512K=/data/prolong-data-512K \
#     bash examples/prolong/01_prepare_data.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
knobs_recipe_paths
knobs_tokenizer
HERE="$REPO/examples/prolong"
MANIFEST=${MANIFEST:-$(if_tiny "$HERE/tiny/sources.tsv" "$HERE/sources.sample.tsv")}  ## DATA_FROM=raw: source -> inputs, JSON key, group-by, minimum tokens
RAW_DIR=${RAW_DIR:-$(if_tiny "$REPO/data_tools/sample" data/raw)}  ## folder the manifest's input patterns are relative to
WORKERS=${WORKERS:-$(if_tiny 1 16)}                  ## tokenizer processes per source
PROLONG_DATA_64K=${PROLONG_DATA_64K:-}               ## DATA_FROM=prolong: the downloaded prolong-data-64K folder
PROLONG_DATA_512K=${PROLONG_DATA_512K:-}             ## DATA_FROM=prolong: the downloaded prolong-data-512K folder
parse_args "$@"

# prepare_raw: check the whole manifest first (every pattern matches a file), then tokenize.
prepare_raw() {
  need_file MANIFEST "the source manifest"
  need_dir RAW_DIR "the raw data the manifest names"
  need_path TOKENIZER "the Llama-3 tokenizer"
  need_int WORKERS
  need_lce_data preprocess
  _manifest check
  _manifest run
}

# _manifest check|run: parse MANIFEST; check: every line and input; run: tokenize each source.
_manifest() {
  local pass=$1 line_number=0 sources=0 line source patterns key group min_tokens extra
  while IFS= read -r line || [ -n "$line" ]; do
    line_number=$((line_number + 1))
    line=${line%%#*}
    [ -n "${line//[[:space:]]/}" ] || continue
    read -r source patterns key group min_tokens extra <<< "$line"
    local where="MANIFEST=$MANIFEST:$line_number"
    if [ -z "$min_tokens" ] || [ -n "$extra" ]; then
      die "$where: expected 5 columns (source, inputs, json_key, group_by, min_tokens; '-' for none), got: $line"
    fi
    [[ $source =~ ^[A-Za-z0-9._-]+$ ]] ||
      die "$where: source name '$source' must be letters, digits, '.', '_' or '-'"
    [ "$min_tokens" = - ] || [[ $min_tokens =~ ^[0-9]+$ ]] ||
      die "$where: min_tokens '$min_tokens' must be a number or '-'"
    local inputs=() pattern pattern_list matches
    IFS=, read -r -a pattern_list <<< "$patterns"
    for pattern in "${pattern_list[@]}"; do
      [[ $pattern = /* ]] || pattern="$RAW_DIR/$pattern"
      _glob "$pattern"
      [ -e "${matches[0]}" ] || die "$where: '$pattern' matches no file (source $source)"
      inputs+=("${matches[@]}")
    done
    sources=$((sources + 1))
    [ "$pass" = run ] || continue
    local args=(--input "${inputs[@]}" --output-prefix "$TOKENIZED_DIR/$source"
                --tokenizer "$TOKENIZER" --workers "$WORKERS" --quiet)
    [ "$key" = - ] || args+=(--json-keys "$key")
    [ "$group" = - ] || args+=(--group-by "$group")
    [ "$min_tokens" = - ] || args+=(--min-tokens "$min_tokens")
    _run_once "$TOKENIZED_DIR/$source" lce-data preprocess "${args[@]}"
  done < "$MANIFEST"
  [ "$sources" -gt 0 ] || die "MANIFEST=$MANIFEST lists no source"
}

# _glob PATTERN: the files PATTERN matches, into `matches` (PATTERN itself if none). The
# pattern is expanded as a glob but never split into words: RAW_DIR may hold spaces.
_glob() {
  local IFS=
  # Unquoted on purpose: the pattern is a glob.
  # shellcheck disable=SC2206
  matches=($1)
}

# prepare_prolong: import every source folder of each download into its own data root.
prepare_prolong() {
  need_value PROLONG_DATA_64K "the downloaded prolong-data-64K folder (stage 1's sources)"
  need_dir PROLONG_DATA_64K "the downloaded prolong-data-64K folder"
  need_value PROLONG_DATA_512K "the downloaded prolong-data-512K folder (stage 2's sources)"
  need_dir PROLONG_DATA_512K "the downloaded prolong-data-512K folder"
  need_lce_data import-mds
  # Sources and their outputs in two arrays: a path may hold any character, ':' included.
  local downloads=("$PROLONG_DATA_64K" "$PROLONG_DATA_512K")
  local roots=("$STAGE1_DATA_ROOT" "$STAGE2_DATA_ROOT")
  local k folder sources=() outputs=()
  for k in 0 1; do
    for folder in "${downloads[$k]}"/*/; do
      [ -d "$folder" ] || die "${downloads[$k]} holds no source folder (expected e.g. book-65536/)"
      sources+=("${folder%/}")
      outputs+=("${roots[$k]}/$(basename "$folder")")
    done
  done
  for k in "${!sources[@]}"; do
    _run_once "${outputs[$k]}" lce-data import-mds "${sources[$k]}" --output-prefix "${outputs[$k]}"
  done
}

# _run_once PREFIX COMMAND...: run COMMAND unless PREFIX.idx (written last) already exists.
_run_once() {
  local prefix=$1
  shift
  if [ -f "$prefix.idx" ]; then
    note "kept $prefix (already built; delete $prefix.* to build it again)"
    return 0
  fi
  printf '%q ' "$@"; printf '\n'
  [ "$MODE" = run ] || return 0
  mkdir -p "$(dirname "$prefix")"
  "$@"
}

if [ "$DATA_FROM" = raw ]; then prepare_raw; else prepare_prolong; fi
