# shellcheck shell=bash
# Shared by every launcher in examples/ (sourced, never run). A script is its header comment
# (its usage, printed by --help) and one line handing over to Python:
#   run_stage STAGE "$@"
# `python -m engine.recipe STAGE` holds the rest (engine/recipe/): the settings (environment
# variables, one table with their defaults, TINY=1's and their meaning, listed by --help), the
# checks -- a missing path or a bad value stops the script (exit 2, naming it) before any
# process group or GPU memory is touched -- and the stage's commands, each printed before it
# runs (--check: printed, none run). The training stages launch through engine.launch: it
# takes TP/PP/CP as given or the planner's layout, builds the torchrun command (c10d
# rendezvous) and runs it; SIGTERM makes the trainer checkpoint and stop.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The scripts run the engine of the checkout they live in, installed or not.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# run_stage STAGE ARG...: the calling script's stage in Python, in this process (exec), so that
# a SIGTERM to the script reaches the launch.
run_stage() {
  local script
  script=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")
  exec "${PYTHON:-python3}" -m engine.recipe --repo "$REPO" --script "$script" "$@"
}
