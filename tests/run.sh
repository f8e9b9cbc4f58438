#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (the README's test command; CI runs it too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/setup_env.sh test
# Lint first (ruff.toml: pyflakes and pycodestyle errors): a clean result is part of passing.
python3 -m ruff check .
exec python3 -m pytest -q -p no:cacheprovider tests "$@"
