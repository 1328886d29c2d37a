#!/usr/bin/env bash
# Backflow on S3 (one Garage node on loopback, the test harness's store) against backflow on a
# local repository and against restic's S3 backend on the same Garage, all in one run so that they
# compare as ratios on a noisy machine. The SIZE image from `backflow-fixtures` (seed 1), then the
# same image with 5% changed (seed 2), as benches/e2e.sh makes them. Per repetition, in this order
# for every step (local, garage, restic):
#   full backup of the image into a fresh repository; incremental backup of the changed image (same
#   path); restore of that latest snapshot to a file (backflow --no-sync, restic restore: both end
#   in the page cache), checked with cmp against the changed image.
# Every step runs under GNU time (wall, peak RSS, CPU); Garage's CPU time meanwhile comes from
# /proc (the store shares the machine's cores, so on a small machine its work is part of the cost).
# Prints a Markdown table of the medians over RUNS repetitions and the ratios against the goals of
# issue 13 (Garage >= 0.7x of local throughput each way; backflow on Garage >= 2x restic on Garage;
# backflow's peak RSS < 128 MiB), and writes the same to a results file.
#
# PIN=1 confines every client (backflow, restic) to core 0 and the store to core 1, as if the store
# ran on a host of its own: the ratios then compare the clients' own costs, which sharing two cores
# with the store hides (each S3 step's wall time is otherwise bound by client + store CPU / cores).
#
#   bash benches/e2e-s3.sh [SIZE]      default 2G; RUNS=3, PIN=0, BENCH_DIR=/var/tmp/backflow-e2e-s3,
#                                      RESULTS=target/bench-results/e2e-s3-DATE.md (+ .logs/: the
#                                      --stats tables of backflow's steps)
# Extra variables reach backflow unchanged (BACKFLOW_S3_MAX_REQUESTS, ...), so a tunable can be
# tried with the same script. Needs about 5x SIZE of free disk (the images, the local repository,
# Garage's blocks of every repetition, a restored file). backflow is the release build without test
# hooks (`cargo build --release -p backflow`, as scripts/no-hooks.sh checks), copied into the work
# directory so that a `cargo test` of someone else cannot swap it for a hooked one during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
RUNS=${RUNS:-3}
WORK=${BENCH_DIR:-/var/tmp/backflow-e2e-s3}
RESULTS=${RESULTS:-target/bench-results/e2e-s3-$(date -u +%Y%m%dT%H%M%SZ).md}
# Peak RSS goal of issue 13, MiB.
RSS_GOAL_MIB=128

source benches/peers.sh
source benches/s3.sh
# shellcheck disable=SC2119 # no extra tools
peers_setup
mkdir -p "$(dirname "$RESULTS")" "$RESULTS.logs"
RESULTS=$(realpath "$RESULTS")

# The binary as a user gets it, frozen for the run; refuse one with test hooks (a hooked backup
# creates the pause file and waits for it to go: the timeout ends it).
cp "$BF" "$WORK/backflow"
BF=$WORK/backflow
mkdir -p "$WORK/hooks"
head -c 1048576 /dev/urandom >"$WORK/hooks/disk.img"
"$BF" init --repo "$WORK/hooks/repo" >/dev/null
BACKFLOW_PAUSE_BEFORE_COMMIT="$WORK/hooks/paused" timeout -k 5 30 "$BF" run specs/backup-image.yaml \
  --quiet --var source="$WORK/hooks/disk.img" --var repo="$WORK/hooks/repo" --var disk=disk >/dev/null || true
if [ -e "$WORK/hooks/paused" ]; then
  echo "e2e-s3: $BF has test hooks (a cargo test rebuilt it): run again" >&2
  exit 1
fi
rm -rf "$WORK/hooks"

s3_store garage
# CLIENT: what runs each measured command (the core it may use under PIN=1).
CLIENT=()
if [ "${PIN:-0}" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "e2e-s3: PIN=1 needs at least 2 cores" >&2; exit 1; }
  for pid in $S3_PIDS; do taskset -a -p -c 1 "$pid" >/dev/null; done
  CLIENT=(taskset -c 0)
fi
export BACKFLOW_SCRATCH_DIR=$WORK/scratch RESTIC_CACHE_DIR=$WORK/restic-cache

echo "generating a $SIZE image and its 5% change" >&2
"$FX" image --size "$SIZE" --seed 1 "$WORK/orig.img" >/dev/null
cp --sparse=always "$WORK/orig.img" "$WORK/changed.img"
"$FX" change --fraction 0.05 --seed 2 "$WORK/changed.img" >&2
BYTES=$(stat -c %s "$WORK/orig.img")
IMG=$WORK/disk.img

# store_cpu: CPU seconds the store's servers have used so far (user + system, /proc/PID/stat).
store_cpu() {
  local pid total=0
  for pid in $S3_PIDS; do
    total=$(awk -v t="$total" -v hz="$(getconf CLK_TCK)" '{ print t + ($14 + $15) / hz }' "/proc/$pid/stat")
  done
  echo "$total"
}
# timed NAME CMD...: CMD under GNU time; appends "NAME wall_s rss_kib user_s sys_s store_cpu_s" to
# $WORK/times (store_cpu_s: what Garage spent meanwhile, whoever asked) and keeps CMD's output in
# $RESULTS.logs/NAME.log.
timed() {
  local name=$1 before; shift
  before=$(store_cpu)
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/t" "${CLIENT[@]}" "$@" >"$RESULTS.logs/$name.log" 2>&1 \
    || { cat "$RESULTS.logs/$name.log" >&2; exit 1; }
  echo "$name $(cat "$WORK/t") $(awk -v a="$before" -v b="$(store_cpu)" 'BEGIN { printf "%.2f", b - a }')" >>"$WORK/times"
  echo "  $(tail -1 "$WORK/times")" >&2
}
# image FILE: FILE's bytes at the path every backup reads, in the page cache.
image() { cp --sparse=always "$1" "$IMG"; cat "$IMG" >/dev/null; }
bf_backup() { # NAME REPO
  timed "$1" "$BF" run specs/backup-image.yaml --stats --var source="$IMG" --var repo="$2" --var disk=disk
}
bf_restore() { # NAME REPO
  rm -f "$WORK/out.img"
  timed "$1" "$BF" restore --stats --no-sync --repo "$2" --snapshot latest --to "$WORK/out.img"
  cmp "$WORK/changed.img" "$WORK/out.img" || { echo "e2e-s3: $1 restored different bytes" >&2; exit 1; }
  rm -f "$WORK/out.img"
}

LOADS=()
for r in $(seq 1 "$RUNS"); do
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  echo "repetition $r of $RUNS (load average ${LOADS[-1]})" >&2
  local_repo=$WORK/local-$r
  garage_repo=s3://$S3_BUCKET/backflow-$r
  restic_repo=s3:$AWS_ENDPOINT_URL/$S3_BUCKET/restic-$r
  "$BF" init --repo "$local_repo" >/dev/null
  "$BF" init --repo "$garage_repo" >/dev/null
  restic -q -r "$restic_repo" init >/dev/null

  image "$WORK/orig.img"
  bf_backup "local_full_$r" "$local_repo"
  bf_backup "garage_full_$r" "$garage_repo"
  timed "restic_full_$r" restic -q -r "$restic_repo" backup "$IMG"

  image "$WORK/changed.img"
  bf_backup "local_incr_$r" "$local_repo"
  bf_backup "garage_incr_$r" "$garage_repo"
  timed "restic_incr_$r" restic -q -r "$restic_repo" backup "$IMG"

  rm -f "$IMG"
  bf_restore "local_restore_$r" "$local_repo"
  bf_restore "garage_restore_$r" "$garage_repo"
  rm -rf "$WORK/restic-out"
  timed "restic_restore_$r" restic -q -r "$restic_repo" restore latest --target "$WORK/restic-out"
  cmp "$WORK/changed.img" "$(find "$WORK/restic-out" -type f -name disk.img)" \
    || { echo "e2e-s3: restic_restore_$r restored different bytes" >&2; exit 1; }
  rm -rf "$WORK/restic-out" "$local_repo"
done
LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
echo "every restore is identical to the changed image (cmp)" >&2

# med STEP FIELD: the median over the repetitions (FIELD 2: wall s, 3: RSS KiB, cpu: user + system
# s, 6: Garage's CPU s).
med() {
  local step=$1 field=$2 r
  for r in $(seq 1 "$RUNS"); do
    awk -v k="${step}_$r" -v f="$field" '$1 == k { print (f == "cpu" ? $4 + $5 : $f) }' "$WORK/times"
  done | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
# all STEP: every repetition's wall time, "a / b / c".
all() {
  local step=$1 r out=""
  for r in $(seq 1 "$RUNS"); do
    out+="${out:+ / }$(awk -v k="${step}_$r" '$1 == k { print $2 }' "$WORK/times")"
  done
  echo "$out"
}
# maxrss STEP: the highest peak RSS over the repetitions, MiB.
maxrss() {
  local step=$1
  awk -v p="^${step}_" '$1 ~ p && $3 > m { m = $3 } END { printf "%.0f", m / 1024 }' "$WORK/times"
}
rate() { awk -v b="$BYTES" -v s="$1" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v v="$1" -v g="$2" 'BEGIN { print (v >= g ? "met" : "MISSED") }'; }

report() {
  local who step wall name
  echo "Image: $SIZE ($(awk -v b="$BYTES" 'BEGIN { printf "%.0f", b / 1048576 }') MiB) from backflow-fixtures (seed 1), 5% changed (seed 2)."
  echo "Store: one Garage node on loopback (backflow-test-store garage, blocks uncompressed); restic $(restic version | cut -d' ' -f2)."
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average (1/5/15 min) at each repetition's start and at the end: $(printf '%s; ' "${LOADS[@]}")"
  echo "Commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- repository cli pipeline stages 2>/dev/null || echo ' + uncommitted changes'); date $(date -u +%Y-%m-%dT%H:%MZ); $RUNS repetitions, interleaved (local, garage, restic per step); medians."
  if [ "${PIN:-0}" = 1 ]; then
    echo "Cores: PIN=1, every client on core 0, the store on core 1 (as if on a host of its own)."
  else
    echo "Cores: shared, the store and the clients on all $(nproc)."
  fi
  local tunables
  tunables=$(env | grep -E '^BACKFLOW_S3_' | sort | tr '\n' ' ' || true)
  echo "S3 settings from the environment: ${tunables:-none (defaults)}"
  echo
  echo "| step | tool | wall s, median (runs) | MiB/s | CPU s | Garage CPU s | peak RSS MiB, highest |"
  echo "|---|---|---|---:|---:|---:|---:|"
  for step in full incr restore; do
    for who in local garage restic; do
      case $who in
        local) name="backflow, local" ;;
        garage) name="backflow, Garage" ;;
        restic) name="restic, Garage" ;;
      esac
      wall=$(med "${who}_$step" 2)
      echo "| $step | $name | $wall ($(all "${who}_$step")) | $(rate "$wall") | $(med "${who}_$step" cpu) | $(med "${who}_$step" 6) | $(maxrss "${who}_$step") |"
    done
  done
  echo
  echo "| ratio | full | incr | restore | goal |"
  echo "|---|---:|---:|---:|---|"
  local g_l=() g_r=() v m
  for step in full incr restore; do
    g_l+=("$(ratio "$(med "local_$step" 2)" "$(med "garage_$step" 2)")")
    g_r+=("$(ratio "$(med "restic_$step" 2)" "$(med "garage_$step" 2)")")
  done
  echo "| Garage / local throughput | ${g_l[0]} | ${g_l[1]} | ${g_l[2]} | >= 0.7 each way: backup $(verdict "${g_l[0]}" 0.7), restore $(verdict "${g_l[2]}" 0.7) |"
  echo "| backflow / restic on Garage | ${g_r[0]}x | ${g_r[1]}x | ${g_r[2]}x | >= 2x: backup $(verdict "${g_r[0]}" 2), restore $(verdict "${g_r[2]}" 2) |"
  v=0
  for step in full incr restore; do
    for who in local garage; do
      m=$(maxrss "${who}_$step"); [ "$m" -gt "$v" ] && v=$m
    done
  done
  echo
  echo "backflow's highest peak RSS over every step: $v MiB (goal < $RSS_GOAL_MIB MiB: $([ "$v" -lt $RSS_GOAL_MIB ] && echo met || echo MISSED))."
}
report | tee "$RESULTS"
echo "results: $RESULTS (backflow's --stats per step in $RESULTS.logs/)" >&2
