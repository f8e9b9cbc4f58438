#!/usr/bin/env bash
# The lm-evaluation-harness hand-off test (tests/engine/test_lm_eval_handoff.py) with lm-eval
# installed, so that it runs instead of skipping: a virtual environment over the suite's
# Python (--system-site-packages: its torch, transformers and this checkout's engine) with
# lm-eval pinned, cached per machine and version under ~/.cache/longctx-engine/ci.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LM_EVAL_VERSION=0.4.13
base_python=$(command -v python3)
torch_version=$("$base_python" -c 'import torch; print(torch.__version__)')
cache_root="${LCE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/longctx-engine/ci}"
venv="$cache_root/lm-eval$LM_EVAL_VERSION-$("$base_python" -c \
  'import sys; print("py%d.%d" % sys.version_info[:2])')-torch$torch_version"
mkdir -p "$cache_root"
exec 9> "$venv.lock"
flock 9
start=$SECONDS
if [ ! -e "$venv/complete" ]; then
  echo "ci: building $venv (downloads lm-eval $LM_EVAL_VERSION and its hf/ruler extras)"
  rm -rf "$venv"
  "$base_python" -m venv --system-site-packages "$venv"
  # torch stays the base environment's: lm-eval may not replace it.
  "$venv/bin/python" -m pip install -q "lm-eval[hf,ruler]==$LM_EVAL_VERSION" "torch==$torch_version"
  touch "$venv/complete"
fi
echo "ci: lm-eval environment ready in $((SECONDS - start)) s"
flock -u 9
LCE_REQUIRE_LM_EVAL=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/engine/test_lm_eval_handoff.py "$@"
echo "ci: lm-eval hand-off took $((SECONDS - start)) s in all"
