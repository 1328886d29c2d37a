#!/usr/bin/env bash
# gc scaling: does `backflow gc` keep its memory flat and its time at most linear when the repository
# has 10x the chunks? Generates two repositories with `gen-gc-repo` (benches/src/gc_repo.rs: one VM,
# 10 daily snapshots of one disk, each changing 10% of the disk's chunks, 64 KiB chunks stored
# zstd-compressed at a few hundred bytes each, ~450 chunks per pack), CHUNKS and 10 x CHUNKS distinct
# chunks. On each: `backflow forget --keep-last 5`, then `backflow gc --json` under GNU time (wall
# time, peak RSS), then `backflow verify --read-data`. Fails (non-zero) if verify fails after gc,
# if gc waits, reports missing chunks or the repository did not shrink. Prints one Markdown table
# and the 10x/1x ratios.
#
#   bash benches/gc-scale.sh [CHUNKS]       # default 20000 (and 200000); BENCH_DIR=target/gc-scale
# RUNS=3 (default) gc runs per repository, each on a fresh copy, alternating between the two sizes:
# the median time, the highest RSS.
# Needs about 1.1 KiB of disk per chunk (250 MiB for the default: each repository and a copy). Installs nothing: without
# /usr/bin/time, peak RSS comes from python3's wait4.
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${1:-20000}
SNAPSHOTS=10
KEEP=$((SNAPSHOTS / 2))
RUNS=${RUNS:-3}
WORK=${BENCH_DIR:-$PWD/target/gc-scale}

# size_of, get, json_num (the helpers of the end-to-end scripts; peers_setup is not called: nothing
# to install here).
source benches/peers.sh

cargo build --release -q -p backflow -p backflow-benches --bin backflow --bin gen-gc-repo
BF=$PWD/target/release/backflow
GEN=$PWD/target/release/gen-gc-repo
if ! "$BF" gc --help >/dev/null 2>&1; then
  echo "this backflow has no gc command" >&2
  exit 1
fi
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

# timed NAME CMD...: runs CMD, output to $WORK/NAME.log; appends "NAME seconds max_rss_kib" to
# $WORK/times. Exits with CMD's log on stderr if CMD fails.
timed() {
  local name=$1; shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "%e %M" -o "$WORK/t" "$@" >"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log" >&2; exit 1; }
  else
    python3 - "$WORK/t" "$@" >"$WORK/$name.log" 2>&1 <<'EOF' || { cat "$WORK/$name.log" >&2; exit 1; }
import os, sys, time
start = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.monotonic() - start:.2f} {usage.ru_maxrss}\n")
sys.exit(os.waitstatus_to_exitcode(status))
EOF
  fi
  echo "$name $(cat "$WORK/t")" >>"$WORK/times"
}
packs_in() { find "$1/packs" -name '*.pack' | wc -l; }

prepare() { # $1: label (1x, 10x), $2: chunks. Generates $WORK/gen-LABEL and forgets half of it.
  local label=$1 chunks=$2 gen=$WORK/gen-$1
  echo "generating $label: $chunks chunks" >&2
  timed gen_$label "$GEN" --out "$gen" --chunks "$chunks" --snapshots "$SNAPSHOTS"
  cat "$WORK/gen_$label.log" >&2
  "$BF" verify --repo "$gen" >"$WORK/verify-before-$label.log" 2>&1 \
    || { cat "$WORK/verify-before-$label.log" >&2; echo "FAILED: the generated $label repository does not verify" >&2; exit 1; }
  "$BF" forget --repo "$gen" --keep-last "$KEEP" >"$WORK/forget-$label.log"
  echo "size_before_$label $(size_of "$gen")" >>"$WORK/times"
  echo "packs_before_$label $(packs_in "$gen")" >>"$WORK/times"
}

collect() { # $1: label, $2: run. gc changes the repository: each run collects a fresh copy.
  local label=$1 run=$2 repo=$WORK/repo-$1 log=$WORK/gc_$1_$2.log missing data=""
  rm -rf "$repo"; cp -a "$WORK/gen-$label" "$repo"; sync
  echo "gc $label, run $run of $RUNS" >&2
  timed "gc_${label}_$run" "$BF" gc --repo "$repo" --json
  if grep -q '"waiting_for": "' "$log"; then
    cat "$log" >&2; echo "FAILED: gc $label deleted nothing: it waits" >&2; exit 1
  fi
  # verify passed before gc: every reference is indexed, so gc must find none missing.
  missing=$(json_num missing_chunks "$log")
  if [ "$missing" != 0 ]; then
    cat "$log" >&2; echo "FAILED: gc of the $label repository reports $missing missing chunks" >&2; exit 1
  fi
  # Every chunk's content after the last run (the runs collect identical copies); structure after each.
  [ "$run" -eq "$RUNS" ] && data=--read-data
  echo "verify $data $label" >&2
  if ! "$BF" verify --repo "$repo" $data >"$WORK/verify-$label.log" 2>&1; then
    cat "$WORK/verify-$label.log" >&2
    echo "FAILED: verify after gc of the $label repository" >&2
    exit 1
  fi
}

summarize() { # $1: label, after its last run: median time, highest RSS, sizes, final checks.
  local label=$1 repo=$WORK/repo-$1 snaps runs
  runs=$(seq 1 "$RUNS")
  cp "$WORK/gc_${label}_$RUNS.log" "$WORK/gc_$label.log"
  echo "gc_$label $(for run in $runs; do get "gc_${label}_$run" 2; done | sort -n \
    | awk '{t[NR] = $1} END {print (NR % 2 ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2)}') \
    $(for run in $runs; do get "gc_${label}_$run" 3; done | sort -n | tail -1)" >>"$WORK/times"
  echo "gc_times_$label $(for run in $runs; do get "gc_${label}_$run" 2; done | paste -sd/)" >>"$WORK/times"
  echo "size_after_$label $(size_of "$repo")" >>"$WORK/times"
  echo "packs_after_$label $(packs_in "$repo")" >>"$WORK/times"
  snaps=$("$BF" snapshots --repo "$repo" | grep -c gc-bench || true)
  [ "$snaps" -eq "$KEEP" ] || { echo "FAILED: $snaps snapshots after gc of $label, expected $KEEP" >&2; exit 1; }
  if [ "$(get size_after_$label 2)" -ge "$(get size_before_$label 2)" ]; then
    echo "FAILED: the $label repository did not shrink ($(get size_before_$label 2) -> $(get size_after_$label 2) bytes)" >&2
    exit 1
  fi
  rm -rf "$WORK/gen-$label" "$repo"
}

prepare 1x "$CHUNKS"
prepare 10x $((CHUNKS * 10))
# Runs alternate between the two sizes, so that a change of the machine's load hits both.
for run in $(seq 1 "$RUNS"); do
  collect 1x "$run"
  collect 10x "$run"
done
summarize 1x
summarize 10x

mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo
echo "Generated: one VM, $SNAPSHOTS snapshots of one disk (64 KiB chunks, each incremental changes 10%: a"
echo "5% hot band and 5% scattered), forget --keep-last $KEEP, then gc (default repack threshold)."
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
echo
echo "| repository | chunks | packs before -> after | repository before -> after | packs removed / rewritten | gc time, median (runs) | gc peak RSS, highest |"
echo "|---|---|---|---|---|---|---|"
for l in 1x 10x; do
  log=$WORK/gc_$l.log
  echo "| $l | $(json_num chunks "$WORK/gen_$l.log") \
| $(get packs_before_$l 2) -> $(get packs_after_$l 2) \
| $(mib "$(get size_before_$l 2)") -> $(mib "$(get size_after_$l 2)") MiB \
| $(json_num packs_removed "$log") / $(json_num packs_repacked "$log") \
| $(get gc_$l 2) s ($(get gc_times_$l 2)) | $(awk -v k="$(get gc_$l 3)" 'BEGIN {printf "%.1f", k / 1024}') MiB |"
done
echo
awk -v t1="$(get gc_1x 2)" -v t10="$(get gc_10x 2)" -v r1="$(get gc_1x 3)" -v r10="$(get gc_10x 3)" \
  'BEGIN {printf "10x / 1x: gc time %.2fx, peak RSS %.2fx\n", (t10 > 0 ? t10 : 0.01) / (t1 > 0 ? t1 : 0.01), r10 / r1}'
