#!/usr/bin/env bash
# One node, or one node of a multi-node job started by hand on each node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/train_torchrun.sh engine/configs/prolong-stage1-64k.yaml [k=v ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG=${1:?usage: train_torchrun.sh CONFIG.yaml [section.key=value ...]}; shift
GPUS=${GPUS_PER_NODE:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
# NCCL: one channel per direction keeps TP communication ordered with compute (as Megatron-LM).
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec python3 -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$GPUS" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
    --rdzv-conf timeout=900 \
    -m engine.train --config "$CONFIG" "$@"
