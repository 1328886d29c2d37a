#!/usr/bin/env bash
# What serving the console costs a running backup: the throughput of the same full backup (an
# image job, SIZE of `backflow-fixtures` data, seed 1, into a fresh local repository) run by
# `backflow daemon` without its console (`--http off`) and with it under load, alternating, in one
# run so that they compare as a ratio on a noisy machine. The load, all through the whole backup:
#   - a Prometheus scrape of /metrics every SCRAPE seconds (default 1: fifteen times Prometheus's
#     default interval);
#   - the dashboard's reads (/api/vms, /api/jobs, /api/sessions?limit=20, /api/repositories) every
#     POLL seconds (default 1: three times what the page does);
#   - the live view's event stream (/api/pipelines/events) held open, read to the end.
# The clients are one Python process on keep-alive connections (curl processes started every
# second cost the two cores more than the console does). The job starts at the daemon's start (a
# made-up session two days old, recorded by `backflow-test-session`, makes it owe its 03:00 run);
# the throughput is the backup's bytes read over its seconds, from its session record. Before each
# run `sync` writes back what the run before left dirty (else its writeback slows the next). Besides
# the throughput, the daemon's CPU time (utime + stime from /proc when the session is recorded)
# per GiB backed up, with and without the console: the CPU the console takes, which does not move
# with the disk's noise as the throughput does. Prints a Markdown table of the medians over RUNS
# repetitions (and each run's values), the ratios with / without, and writes it to a results
# file. Nothing is left: daemons and clients are stopped by pid, the work directory removed.
#
#   bash benches/e2e-console.sh [SIZE]   default 2G; RUNS=5, SCRAPE=1, POLL=1,
#                                        BENCH_DIR=/var/tmp/backflow-console-bench,
#                                        RESULTS=target/bench-results/e2e-console-DATE.md
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
RUNS=${RUNS:-5}
SCRAPE=${SCRAPE:-1}
POLL=${POLL:-1}
WORK=${BENCH_DIR:-/var/tmp/backflow-console-bench}
RESULTS=${RESULTS:-target/bench-results/e2e-console-$(date -u +%Y%m%dT%H%M%SZ).md}

source benches/peers.sh
peers_setup
cargo build --release -q -p backflow-testkit --bin backflow-test-session
SESSION=$PWD/target/release/backflow-test-session
# Copied: a `cargo test` elsewhere cannot swap the binary during the run.
cp "$BF" "$WORK/backflow"
BF=$WORK/backflow
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

IMG=$WORK/disk.img
echo "generating a $SIZE image" >&2
"$FX" image --size "$SIZE" --seed 1 "$IMG" >/dev/null
BYTES=$(stat -c %s "$IMG")
cat "$IMG" >/dev/null   # every run reads from the page cache
mkdir -p "$WORK/jobs"

# one MODE N: a fresh repository, the daemon in MODE (off|on), until the session is recorded.
# Appends "MODE MiB/s" to $WORK/rates.
one() {
  local mode=$1 n=$2 repo=$WORK/repo-$1-$2 port http
  "$BF" init --repo "$repo" >/dev/null
  printf 'name: bench\nrepository: %s\nimages: [%s]\nschedule: "0 3 * * *"\n' "$repo" "$IMG" \
    >"$WORK/jobs/bench.yaml"
  "$SESSION" "$repo" bench $((2 * 86400)) >/dev/null
  sync
  if [ "$mode" = on ]; then
    port=$((18500 + n)); http="127.0.0.1:$port"
  else
    http=off
  fi
  "$BF" daemon --jobs "$WORK/jobs" --http "$http" >"$WORK/daemon-$mode-$n.log" 2>&1 &
  local daemon=$!
  PIDS+=("$daemon")
  local clients=()
  if [ "$mode" = on ]; then
    local base="http://$http"
    for _ in $(seq 50); do curl -sf "$base/api/health" >/dev/null && break; sleep 0.1; done
    python3 - "$port" "$SCRAPE" "$POLL" <<'PY' >/dev/null 2>&1 &
import http.client, sys, threading, time
port, scrape, poll = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
def loop(paths, every):
    c = http.client.HTTPConnection("127.0.0.1", port)
    while True:
        for p in paths:
            c.request("GET", p); c.getresponse().read()
        time.sleep(every)
def events():
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/api/pipelines/events")
    r = c.getresponse()
    while r.read(4096):
        pass
for target in (lambda: loop(["/metrics"], scrape),
               lambda: loop(["/api/vms", "/api/jobs", "/api/sessions?limit=20", "/api/repositories"], poll),
               events):
    threading.Thread(target=target, daemon=True).start()
while True:
    time.sleep(3600)
PY
    clients+=($!)
    PIDS+=("${clients[@]}")
  fi
  local rate=""
  for _ in $(seq 1200); do
    rate=$("$BF" sessions --repo "$repo" --job bench --json 2>/dev/null | python3 -c '
import json, sys
for s in json.load(sys.stdin):
    for v in s.get("vms", []):
        if v.get("seconds") and v["result"] == "success":
            print(v["bytes_read"] / v["seconds"] / 2**20)
' || true)
    [ -n "$rate" ] && break
    sleep 0.5
  done
  [ -n "$rate" ] || { echo "no session recorded ($mode $n)" >&2; cat "$WORK/daemon-$mode-$n.log" >&2; exit 1; }
  # The daemon's CPU seconds so far (utime + stime, in clock ticks).
  local ticks
  ticks=$(awk '{print $14 + $15}' "/proc/$daemon/stat")
  for pid in "${clients[@]}"; do kill "$pid" 2>/dev/null || true; done
  kill -TERM "$daemon"; wait "$daemon" 2>/dev/null || true
  echo "$mode $rate $(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v b="$BYTES" \
    'BEGIN {printf "%.3f", t / hz / (b / 2^30)}')" >>"$WORK/rates"
  rm -rf "$repo"
}

for n in $(seq "$RUNS"); do
  echo "repetition $n of $RUNS" >&2
  one off "$n"
  one on "$n"
done

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
OFF=$(awk '$1=="off" {print $2}' "$WORK/rates" | median)
ON=$(awk '$1=="on" {print $2}' "$WORK/rates" | median)
mkdir -p "$(dirname "$RESULTS")"
{
  echo "Console cost on a running backup: $SIZE image ($BYTES bytes, fixtures seed 1), full backup,"
  echo "RUNS=$RUNS alternating, /metrics every ${SCRAPE}s, dashboard reads every ${POLL}s, event stream open."
  echo
  echo "| daemon | backup MiB/s (median) | each run |"
  echo "|---|---:|---|"
  echo "| --http off | $(printf %.1f "$OFF") | $(awk '$1=="off" {printf "%.1f ", $2}' "$WORK/rates")|"
  echo "| console under load | $(printf %.1f "$ON") | $(awk '$1=="on" {printf "%.1f ", $2}' "$WORK/rates")|"
  echo
  echo "with / without: $(awk -v a="$ON" -v b="$OFF" 'BEGIN {printf "%.3f", a / b}') (cost $(awk -v a="$ON" -v b="$OFF" 'BEGIN {printf "%.1f", (1 - a / b) * 100}')%)"
  echo
  CPU_OFF=$(awk '$1=="off" {print $3}' "$WORK/rates" | median)
  CPU_ON=$(awk '$1=="on" {print $3}' "$WORK/rates" | median)
  echo "| daemon | CPU s per GiB backed up (median) | each run |"
  echo "|---|---:|---|"
  echo "| --http off | $CPU_OFF | $(awk '$1=="off" {printf "%s ", $3}' "$WORK/rates")|"
  echo "| console under load | $CPU_ON | $(awk '$1=="on" {printf "%s ", $3}' "$WORK/rates")|"
  echo
  echo "the console's CPU: $(awk -v a="$CPU_ON" -v b="$CPU_OFF" 'BEGIN {printf "%.1f", (a / b - 1) * 100}')% of the backup's"
} | tee "$RESULTS"
