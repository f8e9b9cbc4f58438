#!/usr/bin/env bash
# The kernel measurements of bench/kernels/RESULTS.md on one GPU node, in this order:
#
#   1. versions       GPU, driver, Python, torch, triton, CUDA
#   2. correctness    every kernel in bf16 at 8K and 64K packed tokens of mixed documents against
#                     the fp32 references: max and mean relative error of outputs and gradients
#   3. attention      64K tokens, one long document and a ProLong-like mix: ours vs FlexAttention
#                     vs SDPA per document (and flash-attn if installed), fwd and fwd+bwd, TFLOP/s
#                     counting the attention the document mask keeps, and the ratio to FlexAttention
#   4. linear-ce      fused output layer + cross-entropy at 64K x 128,256: time and peak memory vs
#                     unfused torch (an out-of-memory is reported as such), torch.compile, Liger
#   5. tiles          a 4-5 point sweep of the attention backward tiles at 64K
#   6. train-step     one training step of a Llama-3-8B-shaped 4-layer model at 64K tokens on this
#                     GPU (TP1, full recompute, our kernels): tokens/s and MFU
#   7. tests          the kernel tests (tests/csrc) on the GPU
#
#   bash bench/kernels/gpu_session.sh [--dry] [--out DIR] [STEP ...]    # default: every step
#
# --dry runs every step on the CPU at toy sizes through the same scripts (Triton's interpreter),
# to check the session before a GPU is at hand; its timings mean nothing. Output: DIR/session.log
# (everything printed) and DIR/results.jsonl (one JSON record per benchmark run); DIR defaults to
# ./gpu-session-<date>. SESSION_SECONDS (default 480) caps the whole session, about 8 minutes on
# one H100: step 7 gets what is left (it is skipped with less than 30 s); 0 removes the cap.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2

dry=0
out="gpu-session-$(date -u +%Y%m%dT%H%M%SZ)"
steps=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry) dry=1 ;;
    --out) out=$2; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) steps+=("$1") ;;
  esac
  shift
done
[ ${#steps[@]} -eq 0 ] && steps=(versions correctness attention linear-ce tiles train-step tests)
mkdir -p "$out" || exit 2
log="$out/session.log"
results="$out/results.jsonl"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
budget=${SESSION_SECONDS:-480}
[ "$budget" != 0 ] || budget=""
start=$(date +%s)
failed=0

have_gpu() { python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ $dry -eq 1 ]; then
  export TRITON_INTERPRET=1
  # toy sizes; fp32 because the interpreter's bf16 tl.dot is not usable
  sizes=(--device cpu --dtype fp32 --heads 2 --kv-heads 1 --head-dim 64 --hidden 32 --vocab 100 --ffn 32
         --warmup 1 --iters 1)
  small=64
  large=160
else
  have_gpu || echo "no CUDA device: every GPU step below will fail; run on a GPU node, or with --dry to check the session here" \
    | tee -a "$log"
  sizes=(--warmup 3 --iters 10)
  small=8192
  large=65536
fi

step() {
  local name=$1
  shift
  echo "== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "== $name: exit $rc ($(date -u +%H:%M:%S), $(( $(date +%s) - start )) s into the session)" | tee -a "$log"
}

bench() { python3 bench/kernels/bench.py "$@" "${sizes[@]}" --out "$results"; }

versions() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| gpu', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
}

for name in "${steps[@]}"; do
  case $name in
    versions) step versions versions ;;
    correctness)
      step "correctness $small" bench correctness --tokens "$small"
      step "correctness $large" bench correctness --tokens "$large" ;;
    attention)
      step "attention one document" bench attention --tokens "$large" --docs single
      step "attention mixed documents" bench attention --tokens "$large" --docs mixed ;;
    linear-ce) step linear-ce bench linear-ce --tokens "$large" ;;
    tiles) step tiles bench attention-tiles --tokens "$large" ;;
    train-step)
      if [ $dry -eq 1 ]; then
        step train-step python3 bench/kernels/train_step.py --dry
      else
        step train-step python3 bench/kernels/train_step.py --seq-length "$large"
      fi ;;
    tests)
      # No cap with SESSION_SECONDS=0: timeout 0 never expires.
      left=0
      [ -z "$budget" ] || left=$(( budget - ($(date +%s) - start) ))
      if [ $dry -eq 1 ]; then
        step tests timeout 600 python3 -m pytest -q -p no:cacheprovider tests/csrc/test_csrc_custom_ops.py
      elif ! have_gpu; then
        echo "== tests: no CUDA device: the kernel tests on the GPU need one" | tee -a "$log"
        failed=1
      elif [ -z "$budget" ] || [ $left -gt 30 ]; then
        step tests timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/csrc
      else
        echo "== tests: skipped, ${left} s left of the ${budget} s budget" | tee -a "$log"
      fi ;;
    *) echo "unknown step '$name': the steps are versions correctness attention linear-ce tiles train-step tests" \
         | tee -a "$log"; exit 2 ;;
  esac
done
echo "session log: $log   results: $results" | tee -a "$log"
exit $failed
