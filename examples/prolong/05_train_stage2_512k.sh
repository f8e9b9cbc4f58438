#!/usr/bin/env bash
# Stage 05: ProLong stage 2 -- from stage 1's weights and optimizer state to 512K tokens,
# RoPE base 1.28e8, with the published hyper-parameters (engine/configs/prolong-stage2-512k.yaml:
# 2,500 steps x 16 sequences, lr 5e-6 as in ProLong's public script, 10% warm-up).
# Run it on every node (NODE_RANK 0..NNODES-1), or under SLURM:
#   sbatch --nodes=16 --gpus-per-node=8 examples/train_slurm.sbatch examples/prolong/05_train_stage2_512k.sh
# Relaunching resumes from the run's latest checkpoint; SIGTERM saves one and stops.
# Extra arguments are engine.train overrides (section.key=value).
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage train-stage2 "$@"
