#!/usr/bin/env bash
# tests/system_deps.sh -- the system (Debian/Ubuntu) packages the test suite needs, installed BEFORE
# any test runs. `make test` (and so .ci/run) calls it through `make system-deps`.
#
#   package        probe (present = nothing to do)        needed by
#   slurm-wlm      srun sbatch scontrol slurmctld slurmd   the launcher tests and the local Slurm cluster
#   munge          munged munge unmunge                    Slurm authentication on the local cluster
#   shellcheck     shellcheck                              lint of slurm/*.sh, tests/slurm/*.sh, bench/gpu_suite.sh
#   gcc libc6-dev  gcc, /usr/include/stdio.h               builds the pyxis option stub (tests/slurm/pyxis_stub.c)
#   libslurm-dev   /usr/include/slurm/spank.h              the SPANK header of that stub
#
# Only missing packages are installed (apt-get, --no-install-recommends; `apt-get update` first when
# the package lists are stale or absent). Needs root, or passwordless sudo. Exits non-zero with the
# reason when a package is missing and cannot be installed: the tests are never started on a
# machine that lacks them.
#
#   bash tests/system_deps.sh                  install what is missing
#   bash tests/system_deps.sh --check [PKG...]  only report (all packages, or the named ones); exit 1
#                                               when something is missing (the test fixtures use this)
set -euo pipefail

log() { echo "[system-deps] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# probe PACKAGE: 0 when everything the tests use from PACKAGE is on this machine
probe() {
  local c
  case $1 in
    slurm-wlm) for c in srun sbatch scontrol scancel squeue sinfo slurmctld slurmd; do command -v "$c" >/dev/null || return 1; done ;;
    munge) for c in munged munge unmunge; do command -v "$c" >/dev/null || return 1; done ;;
    shellcheck) command -v shellcheck >/dev/null ;;
    gcc) command -v gcc >/dev/null ;;
    libc6-dev) [ -f /usr/include/stdio.h ] ;;
    libslurm-dev) [ -f /usr/include/slurm/spank.h ] ;;
    *) die "no probe for package $1" ;;
  esac
}

PACKAGES=(slurm-wlm munge shellcheck gcc libc6-dev libslurm-dev)
CHECK=0
if [ "${1:-}" = --check ]; then
  CHECK=1
  shift
  [ $# -eq 0 ] || PACKAGES=("$@")
fi
[ $# -eq 0 ] || [ "$CHECK" = 1 ] || die "usage: bash tests/system_deps.sh [--check [PKG...]]"
missing=()
for p in "${PACKAGES[@]}"; do probe "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
  log "all present: ${PACKAGES[*]}"
  exit 0
fi
if [ "$CHECK" = 1 ]; then
  log "missing: ${missing[*]}: run 'make system-deps' (root or sudo) before the tests"
  exit 1
fi
log "missing: ${missing[*]}"

command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with this system's package manager (the tests need them), or run 'make test SYSTEM_DEPS=0' to skip this step knowingly"
SUDO=()
if [ "$(id -u)" != 0 ]; then
  sudo -n true 2>/dev/null || die "installing ${missing[*]} needs root: run 'sudo make system-deps' (or 'sudo apt-get install -y ${missing[*]}') once, then 'make test'"
  SUDO=(sudo -n)
fi

export DEBIAN_FRONTEND=noninteractive
out=$(mktemp)
trap 'rm -f "$out"' EXIT
t0=$(date +%s)
install() { "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >"$out" 2>&1; }
if ! install; then
  log "apt-get install failed with the current package lists: apt-get update, then retry"
  "${SUDO[@]}" apt-get update >"$out" 2>&1 || { tail -n 20 "$out" >&2; die "apt-get update failed (network or sources.list?)"; }
  install || { tail -n 20 "$out" >&2; die "apt-get install ${missing[*]} failed (output above)"; }
fi
still=()
for p in "${missing[@]}"; do probe "$p" || still+=("$p"); done
[ ${#still[@]} -eq 0 ] || die "apt-get installed ${missing[*]} but still missing what the tests use from: ${still[*]}"
log "installed ${missing[*]} in $(($(date +%s) - t0)) s"
