#!/usr/bin/env bash
# Starts or stops the libvirt daemons the tests talk to (qemu:///system), without systemd.
#   start: when no libvirtd answers, starts virtlogd and libvirtd in the background and waits
#          (at most 10 s) until virsh answers; records what it started in $STARTED.
#   stop:  stops, by pid, only what `start` recorded; destroys the domains first (killing
#          libvirtd leaves their QEMU processes running). A libvirtd it did not start is left alone.
# Runs as root.
set -euo pipefail

URI=qemu:///system
STARTED=/run/backflow-libvirtd.started  # one line per daemon started: NAME PIDFILE
LOG=/var/log/libvirt/libvirtd.log
WAIT_TENTHS=100

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

start() {
  if answers; then
    return 0
  fi
  mkdir -p /run/libvirt /var/log/libvirt
  : >"$STARTED.new"
  if ! { [ -f /run/virtlogd.pid ] && kill -0 "$(cat /run/virtlogd.pid)" 2>/dev/null; }; then
    virtlogd -d
    echo "virtlogd /run/virtlogd.pid" >>"$STARTED.new"
  fi
  libvirtd -d --pid-file /run/libvirtd.pid
  echo "libvirtd /run/libvirtd.pid" >>"$STARTED.new"
  # Recorded before waiting, so that `stop` can end them even when they never answer.
  cat "$STARTED.new" >>"$STARTED"
  rm -f "$STARTED.new"
  for _ in $(seq "$WAIT_TENTHS"); do
    if answers; then
      echo "libvirtd: started (pid $(cat /run/libvirtd.pid))" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "libvirtd: no answer at $URI after $((WAIT_TENTHS / 10)) s; end of $LOG:" >&2
  tail -n 20 "$LOG" >&2 2>/dev/null || true
  exit 1
}

stop_pid_file() {
  local name=$1 pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { echo "libvirtd: stopped $name (pid $pid)" >&2; return 0; }
    sleep 0.1
  done
  echo "libvirtd: $name (pid $pid) did not exit in 10 s" >&2
  return 1
}

stop() {
  [ -f "$STARTED" ] || return 0
  if answers; then
    for dom in $(virsh -c "$URI" list --name); do
      virsh -c "$URI" destroy "$dom" >/dev/null || true
    done
  fi
  local status=0
  # libvirtd before virtlogd: reverse order of starting.
  while read -r name pidfile; do
    stop_pid_file "$name" "$pidfile" || status=1
  done < <(tac "$STARTED")
  rm -f "$STARTED"
  return "$status"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
