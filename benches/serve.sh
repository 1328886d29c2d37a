#!/usr/bin/env bash
# Read throughput of a restore point served over NBD (`backflow serve`) against `backflow restore`
# of the same restore point, on a local repository and on Garage (one node on loopback, the test
# harness's store), all in one run so that they compare as ratios on a noisy machine. The SIZE
# image from `backflow-fixtures` (seed 1) is backed up once into each repository. Per repetition,
# in this order for each repository:
#   restore of the restore point to a file (--no-sync: it ends in the page cache), checked with cmp;
#   nbdcopy of the export to null: (a fresh server: cold cache; nbdcopy's default 4 connections,
#   the export offers multi-conn): the export's read throughput;
#   nbdcopy of the export to a file (a fresh server again), checked with cmp: what a copy costs.
# Each measured command runs under GNU time (wall, peak RSS); each server too (its peak RSS).
# Prints a Markdown table of the medians over RUNS repetitions with the ratios nbdcopy / restore
# and writes it to a results file.
#
#   bash benches/serve.sh [SIZE]      default 2G; RUNS=3, BENCH_DIR=/var/tmp/backflow-serve-bench,
#                                     RESULTS=target/bench-results/serve-DATE.md
# Needs about 4x SIZE of free disk. backflow is the release build without test hooks, copied into
# the work directory so that a `cargo test` elsewhere cannot swap it during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
RUNS=${RUNS:-3}
WORK=${BENCH_DIR:-/var/tmp/backflow-serve-bench}
RESULTS=${RESULTS:-target/bench-results/serve-$(date -u +%Y%m%dT%H%M%SZ).md}

source benches/peers.sh
source benches/s3.sh
peers_setup nbdcopy:libnbd-bin
mkdir -p "$(dirname "$RESULTS")"
RESULTS=$(realpath "$RESULTS")
cp "$BF" "$WORK/backflow"
BF=$WORK/backflow
s3_store garage
export BACKFLOW_SCRATCH_DIR=$WORK/scratch

echo "generating a $SIZE image" >&2
"$FX" image --size "$SIZE" --seed 1 "$WORK/disk.img" >/dev/null
BYTES=$(stat -c %s "$WORK/disk.img")
SOCK=$WORK/serve.sock
URI="nbd+unix:///disk?socket=$SOCK"

# timed NAME CMD...: CMD under GNU time; appends "NAME wall_s rss_kib" to $WORK/times.
timed() {
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/t" "$@" >"$WORK/$name.log" 2>&1 \
    || { cat "$WORK/$name.log" >&2; exit 1; }
  echo "$name $(cat "$WORK/t")" >>"$WORK/times"
  echo "  $(tail -1 "$WORK/times")" >&2
}
# serve_start REPO: a server of REPO's latest restore point under GNU time, once it printed its
# ready line. SERVE_PID is the server's own pid (the child of time).
serve_start() {
  rm -f "$WORK/ready"
  /usr/bin/time -f "%M" -o "$WORK/serve_rss" "$BF" serve --repo "$1" --listen "unix:$SOCK" \
    >"$WORK/ready" 2>"$WORK/serve.log" &
  TIME_PID=$!
  local waited=0
  until grep -q '^listening ' "$WORK/ready" 2>/dev/null; do
    kill -0 "$TIME_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.1
    waited=$((waited + 1))
    [ "$waited" -lt 600 ] || { echo "serve.sh: no ready line in 60 s" >&2; exit 1; }
  done
  SERVE_PID=$(pgrep -P "$TIME_PID")
}
# serve_stop NAME: SIGTERM to the server; records "NAME_server 0 peak_rss_kib".
serve_stop() {
  kill -TERM "$SERVE_PID"
  wait "$TIME_PID"
  echo "$1_server 0 $(tail -1 "$WORK/serve_rss")" >>"$WORK/times"
}

for where in local garage; do
  case $where in
    local) repo=$WORK/repo ;;
    garage) repo=s3://$S3_BUCKET/serve ;;
  esac
  "$BF" init --repo "$repo" >/dev/null
  echo "backing up into $where" >&2
  "$BF" run specs/backup-image.yaml --quiet --var source="$WORK/disk.img" --var repo="$repo" \
    --var disk=disk --var name=disk
done

LOADS=()
for r in $(seq 1 "$RUNS"); do
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  echo "repetition $r of $RUNS (load average ${LOADS[-1]})" >&2
  for where in local garage; do
    case $where in
      local) repo=$WORK/repo ;;
      garage) repo=s3://$S3_BUCKET/serve ;;
    esac
    rm -f "$WORK/out.img"
    timed "${where}_restore_$r" "$BF" restore --no-sync --quiet --repo "$repo" --to "$WORK/out.img"
    cmp "$WORK/disk.img" "$WORK/out.img"
    rm -f "$WORK/out.img"
    serve_start "$repo"
    timed "${where}_null_$r" nbdcopy "$URI" null:
    serve_stop "${where}_null_$r"
    serve_start "$repo"
    timed "${where}_file_$r" nbdcopy "$URI" "$WORK/out.img"
    serve_stop "${where}_file_$r"
    cmp "$WORK/disk.img" "$WORK/out.img"
    rm -f "$WORK/out.img"
  done
done
LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
echo "every restore and every nbdcopy to a file is identical to the image (cmp)" >&2

# med STEP FIELD: the median over the repetitions (FIELD 2: wall s, 3: peak RSS KiB).
med() {
  local step=$1 field=$2 r
  for r in $(seq 1 "$RUNS"); do
    awk -v k="${step}_$r" -v f="$field" '$1 == k { print $f }' "$WORK/times"
  done | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
mbs() { awk -v b="$BYTES" -v s="$1" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }
srv_rss() { # STEP: the median peak RSS of its servers, MiB
  local r
  for r in $(seq 1 "$RUNS"); do
    awk -v k="${1}_${r}_server" '$1 == k { print $3 }' "$WORK/times"
  done | sort -g | awk '{ v[NR] = $1 } END { printf "%.0f", v[int((NR + 1) / 2)] / 1024 }'
}
{
  echo "Export read throughput against restore, $SIZE image ($BYTES bytes), medians of $RUNS,"
  echo "$(nproc) cores, load average ${LOADS[*]} (before each repetition, and after)."
  echo
  echo "| repository | restore to file | nbdcopy to null: | ratio | nbdcopy to file | ratio | server peak RSS |"
  echo "|---|---|---|---|---|---|---|"
  for where in local garage; do
    restore=$(med "${where}_restore" 2)
    null=$(med "${where}_null" 2)
    file=$(med "${where}_file" 2)
    echo "| $where | ${restore} s ($(mbs "$restore") MiB/s) | ${null} s ($(mbs "$null") MiB/s) |" \
      "$(awk -v a="$restore" -v b="$null" 'BEGIN { printf "%.2fx", a / b }') |" \
      "${file} s ($(mbs "$file") MiB/s) | $(awk -v a="$restore" -v b="$file" 'BEGIN { printf "%.2fx", a / b }') |" \
      "$(srv_rss "${where}_null") MiB |"
  done
  echo
  echo "ratio: restore's wall time / nbdcopy's (above 1: the export reads faster than a restore)."
} | tee "$RESULTS"
