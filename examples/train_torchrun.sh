#!/usr/bin/env bash
# Any engine.train config on this node under torchrun (c10d rendezvous); run it once on every
# node of a multi-node job, or let examples/train_slurm.sbatch do that under SLURM.
#   bash examples/train_torchrun.sh CONFIG.yaml [section.key=value ...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/train_torchrun.sh CONFIG.yaml
# The layout is the config's `parallel` section unless TP/PP/CP are set; PLAN_LAYOUT=1 takes
# the one `python -m engine.planner` recommends for NNODES x GPUS_PER_NODE GPUs instead.
# The ProLong stages (examples/prolong/0[4-6]_*.sh) launch through the same code.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_stage train "$@"
