#!/usr/bin/env bash
# The lm-evaluation-harness hand-off test (tests/engine/test_lm_eval_handoff.py) with lm-eval
# installed, so that it runs instead of skipping: a virtual environment over the suite's
# Python (--system-site-packages: its torch, transformers and this checkout's engine) with
# lm-eval pinned, cached per machine and version (.ci/cached_venv.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LM_EVAL_VERSION=0.4.13
base_python=$(command -v python3)
torch_version=$("$base_python" -c 'import torch; print(torch.__version__)')
build_venv() {
  echo "ci: building $1 (downloads lm-eval $LM_EVAL_VERSION and its hf/ruler extras)"
  "$base_python" -m venv --system-site-packages "$1"
  # torch stays the base environment's: lm-eval may not replace it.
  "$1/bin/python" -m pip install -q "lm-eval[hf,ruler]==$LM_EVAL_VERSION" "torch==$torch_version"
}

start=$SECONDS
# shellcheck source=cached_venv.sh
source .ci/cached_venv.sh
cached_venv "lm-eval$LM_EVAL_VERSION-$("$base_python" -c \
  'import sys; print("py%d.%d" % sys.version_info[:2])')-torch$torch_version" build_venv
cached_venv_done
LCE_REQUIRE_LM_EVAL=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/engine/test_lm_eval_handoff.py "$@"
echo "ci: lm-eval hand-off took $((SECONDS - start)) s in all"
