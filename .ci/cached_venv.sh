# shellcheck shell=bash
# Sourced by the CI scripts that need a virtual environment of their own: each is built once per
# machine and pinned versions under CI_CACHE and kept, so that a second run does not download
# its wheels again (PyPI's CUDA torch for Python 3.12 is about 2.7 GB).
CI_CACHE="${LCE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/longctx-engine/ci}"

# cached_venv NAME BUILD: the environment CI_CACHE/NAME, built by the function BUILD (given the
# folder) unless a complete one is there; prints its folder's readiness and sets VENV. Two CI
# runs on one machine share it: one builds, the other waits on the lock. A build that stopped
# half-way has no `complete` stamp and is built again from nothing.
cached_venv() {
  local name=$1 build=$2 start=$SECONDS
  VENV="$CI_CACHE/$name"
  mkdir -p "$CI_CACHE"
  exec 9> "$VENV.lock"
  flock 9
  if [ ! -e "$VENV/complete" ]; then
    rm -rf "$VENV"
    "$build" "$VENV"
    touch "$VENV/complete"
  fi
  echo "ci: environment $name ready in $((SECONDS - start)) s"
}

# cached_venv_done: release the lock cached_venv took (after any install into it).
cached_venv_done() {
  flock -u 9
}
