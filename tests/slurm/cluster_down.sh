#!/usr/bin/env bash
# tests/slurm/cluster_down.sh -- stop what cluster_up.sh started: cancel jobs, then stop the daemons
# by their PID files only (each PID is checked against /proc/PID/comm first), and remove the
# /etc/hosts lines it added. EAOPD_SLURM_PURGE=1 also deletes $EAOPD_SLURM_DIR.
set -uo pipefail
D=${EAOPD_SLURM_DIR:-/tmp/eaopd_slurm}
export SLURM_CONF=$D/etc/slurm.conf
log() { echo "[cluster_down] $*" >&2; }
# shellcheck source=tests/slurm/_pids.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"/_pids.sh

if alive "$D"/run/slurmctld.pid slurmctld && [ -f "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for p in "$D"/run/slurmd-*.pid; do [ -e "$p" ] && stop "$p" slurmd; done
stop "$D"/run/slurmctld.pid slurmctld
stop "$D"/run/munged.pid munged
if grep -q "# eaopd_slurm:$D\$" /etc/hosts 2>/dev/null; then
  # rewrite in place: /etc/hosts is often a bind mount (no sed -i / mv)
  grep -v "# eaopd_slurm:$D\$" /etc/hosts >"$D"/hosts.tmp && cat "$D"/hosts.tmp >/etc/hosts && rm -f "$D"/hosts.tmp
fi
if [ "${EAOPD_SLURM_PURGE:-0}" = 1 ]; then rm -rf "$D"; log "purged $D"; fi
log "down"
