# shellcheck shell=bash
# tests/slurm/_pids.sh -- sourced by cluster_up.sh and cluster_down.sh: daemons are found and stopped
# by their PID files only, each PID checked against /proc/PID/comm first (never by name).
# Needs a log() function from the sourcing script.

# running PID: the process exists and is not a zombie
running() { [ -d /proc/"$1" ] && [ "$(awk '/^State:/{print $2}' /proc/"$1"/status 2>/dev/null)" != Z ]; }

# alive PIDFILE COMM: the PID file names a running process whose comm is COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && running "$pid"
}

# stop PIDFILE COMM: TERM, wait up to 10 s, then KILL; the PID file is removed either way
stop() {
  local pid
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then log "$2 ($pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null; fi
  rm -f "$1"
}
