#!/usr/bin/env bash
# Reading one NBD export, three readers in the same run:
#   backflow   benches/specs/nbd-read.yaml: nbd -> full -> reader (2 workers, 2 connections) -> discard
#   qemu-img   convert -n from the NBD URI to a null-co target (8 coroutines on one connection)
#   nbdcopy    SOURCE null: (libnbd 1.14 defaults: 4 connections, 64 requests in flight each)
# The image is SIZE of generated disk (backflow-fixtures, seed 1) converted to qcow2 and served by
# ONE `qemu-nbd --read-only --persistent --shared 8`; all three ask it for base:allocation and
# read only what is allocated and not zero. Everything is read once first (page cache warm, the
# server's qcow2 metadata cached), then each reader runs 3 times, interleaved. Prints a Markdown
# table: median seconds, MiB/s of the disk's virtual size, and backflow's speed-up over each.
#
#   bash benches/nbd-read.sh [SIZE]          default 2G; needs about 2x SIZE free in $BENCH_DIR
#
# qemu-img cannot convert to /dev/null: with -n it refuses a target smaller than the source
# ("output file is smaller than input file"), so the target is `driver=null-co,size=BYTES`, which
# discards writes as `null:` does for nbdcopy and `discard` for backflow.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
REPEAT=3
WORK=${BENCH_DIR:-/var/tmp/backflow-nbd-read}

for tool in qemu-img qemu-nbd nbdcopy; do
  command -v $tool >/dev/null || { echo "$tool is required (Debian: qemu-utils, libnbd-bin)" >&2; exit 1; }
done
cargo build --release -q -p backflow -p backflow-fixtures
BF=$PWD/target/release/backflow
FX=$PWD/target/release/backflow-fixtures

rm -rf "$WORK"; mkdir -p "$WORK"
SOCK=$WORK/nbd.sock PIDFILE=$WORK/qemu-nbd.pid
# Stops the server by its pid (SIGTERM, then SIGKILL), waiting until it runs no more: a zombie
# (nothing may reap orphans here) counts as stopped.
stop_server() {
  [ -s "$PIDFILE" ] || return 0
  local pid; pid=$(cat "$PIDFILE")
  for sig in TERM KILL; do
    kill -$sig "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
      state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
      [ "$state" = gone ] || [ "$state" = Z ] && return 0
      sleep 0.05
    done
  done
}
trap 'stop_server; rm -rf "$WORK"' EXIT

echo "generating a $SIZE image, converting it to qcow2" >&2
"$FX" image --size "$SIZE" --seed 1 "$WORK/disk.raw" >/dev/null
BYTES=$(stat -c %s "$WORK/disk.raw")
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
rm "$WORK/disk.raw"
cat "$WORK/disk.qcow2" >/dev/null

qemu-nbd --read-only --persistent --shared 8 --fork --format qcow2 \
  --pid-file "$PIDFILE" --socket "$SOCK" "$WORK/disk.qcow2"
URI="nbd+unix:///?socket=$SOCK"
"$BF" init --repo "$WORK/repo" >/dev/null   # `full` looks for a parent there: none, read all

# run TOOL: reads the export once; prints the seconds it took.
run() {
  local start end
  start=$(date +%s.%N)
  case $1 in
    backflow) "$BF" run benches/specs/nbd-read.yaml --quiet --var socket="$SOCK" --var repo="$WORK/repo" \
                --report "$WORK/report.json" ;;
    qemu-img) qemu-img convert -n -f raw "$URI" --target-image-opts "driver=null-co,size=$BYTES" ;;
    nbdcopy) nbdcopy "$URI" null: ;;
  esac
  end=$(date +%s.%N)
  awk -v s="$start" -v e="$end" 'BEGIN {printf "%.3f\n", e - s}'
}

TOOLS=(backflow qemu-img nbdcopy)
echo "warming up" >&2
for t in "${TOOLS[@]}"; do run "$t" >/dev/null; done
for i in $(seq $REPEAT); do
  for t in "${TOOLS[@]}"; do
    s=$(run "$t")
    echo "$t $s" >>"$WORK/times"
    echo "run $i: $t $s s" >&2
  done
done
READ=$(awk -F'[:,]' '/"source_bytes_read"/ {print $2+0; exit}' "$WORK/report.json")

median() { awk -v t="$1" '$1 == t {print $2}' "$WORK/times" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
declare -A MED
for t in "${TOOLS[@]}"; do MED[$t]=$(median "$t"); done
echo
echo "Export: $SIZE qcow2 from backflow-fixtures (seed 1), $(awk -v b="$READ" 'BEGIN {printf "%.0f", b / 1048576}') MiB allocated and not zero (what backflow read), one qemu-nbd --shared 8. Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs). Median of $REPEAT, interleaved; MiB/s of the virtual size."
echo
echo "| reader | median | MiB/s | backflow's speed-up |"
echo "|---|---:|---:|---:|"
for t in "${TOOLS[@]}"; do
  m=${MED[$t]}
  case $t in
    backflow) label="backflow (nbd -> full -> reader x2 -> discard)"; ratio="-" ;;
    qemu-img) label="qemu-img convert -n -> null-co"; ratio=$(awk -v a="$m" -v b="${MED[backflow]}" 'BEGIN {printf "%.2fx", a / b}') ;;
    nbdcopy) label="nbdcopy -> null:"; ratio=$(awk -v a="$m" -v b="${MED[backflow]}" 'BEGIN {printf "%.2fx", a / b}') ;;
  esac
  echo "| $label | $m s | $(awk -v b="$BYTES" -v s="$m" 'BEGIN {printf "%.0f", b / 1048576 / s}') | $ratio |"
done
