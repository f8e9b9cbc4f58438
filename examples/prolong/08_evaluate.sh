#!/usr/bin/env bash
# Stage 08: every stage's checkpoint side by side -- the imported base, stage 1, stage 2, SFT --
# and the Hugging Face export, in one report (`python -m engine.evaluate`): recall at
# EVAL_LENGTHS (RULER/HELMET formats, teacher-forced in the engine, greedy generation through
# transformers for the export), loss by position over long held-out documents and the loss of
# short ones. Writes EVAL_OUT/report.json, report.md and PNG plots. The engine checkpoints are
# evaluated under torchrun on this node in the EVAL_TP x EVAL_PP x EVAL_CP layout, the export
# by rank 0 afterwards. HELMET's other categories (RAG, re-rank, ICL, QA, summarization) and RULER
# through lm-evaluation-harness run on HF_OUT: docs/evaluation.md, "The full benchmarks", gives
# their commands (lm-eval: max_length = the export's max_position_embeddings,
# --apply_chat_template for the SFT export) and what an offline cluster must download first.
#   bash examples/prolong/08_evaluate.sh
#   EVAL_LONG_DOCUMENTS=data/books-heldout EVAL_POSITION_LENGTH=131072 bash examples/prolong/08_evaluate.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage evaluate "$@"
