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
run_stage prepare-data "$@"
