#!/usr/bin/env bash
# Stage 02: the packed stage-1 (64K) and stage-2 (512K) mixtures (`lce-data mix`), from the
# sources 01 wrote. Mixing is cached: an unchanged recipe over unchanged sources is reused.
#   bash examples/prolong/02_build_mixtures.sh
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_stage build-mixtures "$@"
