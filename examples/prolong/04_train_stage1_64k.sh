#!/usr/bin/env bash
# Stage 04: ProLong stage 1 -- continued pre-training of the imported Llama-3-8B-Instruct at
# 64K tokens, RoPE base 8e6, with the published hyper-parameters (engine/configs/
# prolong-stage1-64k.yaml: 5,000 steps x 64 sequences, lr 1e-5, 10% warm-up, cosine to 10%).
# Run it on every node (NODE_RANK 0..NNODES-1), or under SLURM:
#   sbatch --nodes=8 --gpus-per-node=8 examples/train_slurm.sbatch examples/prolong/04_train_stage1_64k.sh
# Relaunching resumes from the run's latest checkpoint; SIGTERM saves one and stops.
# Extra arguments are engine.train overrides (section.key=value).
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage train-stage1 "$@"
