#!/usr/bin/env bash
# The GPU measurements bench/kernels/RESULTS.md still lacks, in as few device calls as possible.
#
#   bash bench/kernels/gpu_session.sh [STEP ...]      # default: every step, in this order
#
# Steps: tests (tests/csrc on the GPU: real bf16 tensor-core tl.dot), model (2-step training,
# all-ours vs all-torch, tests/engine/test_model_kernels.py), attention, attention-single,
# attention-hd64, linear-ce, rmsnorm, rope, swiglu (rows 1-9 of RESULTS.md). Everything a step
# prints goes to $OUT/session.log (or /tmp/gpu_session), and bench.py's JSON lines to
# $OUT/results.jsonl: two files, well inside what a device call brings back. One device call
# runs at most 10 minutes; split the steps over calls if they do not fit (compiles dominate).
#
# Packages the GPU machine lacks (megatron-core for its Python, liger-kernel, psutil,
# splintr-rs, ...) travel as wheels in .whl/ (see the device tool's README) and are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
log="$out/session.log"
results="$out/results.jsonl"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} >>"$log" 2>&1

step() {
  local name=$1
  shift
  echo "== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$log"
  "$@" >>"$log" 2>&1
  echo "== $name: exit $? ($(date -u +%H:%M:%S))" | tee -a "$log"
}

bench() { step "$1" python3 bench/kernels/bench.py "${@:2}" --out "$results"; }

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests model attention attention-single attention-hd64 linear-ce rmsnorm rope swiglu)
for name in "${steps[@]}"; do
  case $name in
    tests) step tests python3 -m pytest -q -p no:cacheprovider tests/csrc ;;
    model) step model python3 -m pytest -q -p no:cacheprovider tests/engine/test_model_kernels.py ;;
    attention) bench attention attention ;;
    attention-single) bench attention-single attention --docs single ;;
    attention-hd64) bench attention-hd64 attention --head-dim 64 --heads 64 --kv-heads 16 ;;
    linear-ce | rmsnorm | rope | swiglu) bench "$name" "$name" ;;
    *) echo "unknown step $name" | tee -a "$log"; exit 2 ;;
  esac
done
grep "^== " "$log" | tail -n $((2 * ${#steps[@]}))
