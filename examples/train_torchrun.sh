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
knobs_launch
PLAN_LAYOUT=${PLAN_LAYOUT:-0}               ## 1: TP/PP/CP from the planner when unset (else the config's)
case ${1:-} in
  -h|--help) usage; exit 0 ;;
  ""|-*) usage >&2; exit 2 ;;
esac
CONFIG=$1
shift
parse_args --allow-overrides "$@"
layout=()
[ "$PLAN_LAYOUT" = 1 ] || layout=(--layout-from-config)
train_stage "${layout[@]}" "$CONFIG" --
