#!/usr/bin/env bash
# What a change costs the incremental: backflow's qcow2 incremental (the e2e-qcow2.sh case: 5% of a
# SIZE image rewritten as scattered 64 KiB blocks, tracked by a persistent dirty bitmap) run by two
# builds, interleaved in one run so that the machine's noise hits both alike.
#
#   bash benches/incremental-ab.sh OLD_BINARY [SIZE] [RUNS]      default 2G, 7 runs each
#
# OLD_BINARY is a `backflow` built from the code before the change (e.g. a `git worktree` of it,
# `cargo build --release -p backflow`); the new one is this tree's target/release/backflow (built
# here). Both start every run from the same state: copies of the repository after the full backup
# and of the image after the change. The order alternates (old first, then new first). Prints each
# run's wall time, and per build the medians of wall time, CPU time (user + system: less sensitive
# to other work on the machine) and the changed-block map stage's busy time, and new / old. One
# incremental of each build is then restored and compared with the image (not timed).
# Needs about 4x SIZE of free disk in $BENCH_DIR (default /var/tmp/backflow-incremental-ab).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(realpath "${1:?usage: incremental-ab.sh OLD_BINARY [SIZE] [RUNS]}")
SIZE=${2:-2G}
RUNS=${3:-7}
WORK=${BENCH_DIR:-/var/tmp/backflow-incremental-ab}

source benches/peers.sh
peers_setup qemu-img:qemu-utils
NEW=$BF
IMG=$WORK/disk.qcow2

echo "generating a $SIZE image, converting it to qcow2, full backup" >&2
"$FX" image --size "$SIZE" --seed 1 "$WORK/disk.raw" >/dev/null
BYTES=$(stat -c %s "$WORK/disk.raw")
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$IMG"
rm "$WORK/disk.raw"
backup() { # $1 binary, $2 report
  "$1" run specs/backup-qcow2.yaml --quiet --var source="$IMG" --var repo="$WORK/repo" \
    --var disk=disk --report "$2"
}
"$NEW" init --repo "$WORK/repo" >/dev/null
backup "$NEW" "$WORK/full.json"

change_blocks "$BYTES" 2 >"$WORK/change.blocks"
commands=()
while read -r block pattern; do
  commands+=(-c "write -q -P $pattern $((block * BLOCK)) $BLOCK")
done <"$WORK/change.blocks"
qemu-io -f qcow2 "${commands[@]}" "$IMG"
cp -a "$WORK/repo" "$WORK/repo.base"
cp --sparse=always "$IMG" "$WORK/image.base"
cat "$WORK/image.base" >/dev/null

reset_state() {
  rm -rf "$WORK/repo"
  cp -a "$WORK/repo.base" "$WORK/repo"
  cp --sparse=always "$WORK/image.base" "$IMG"
}
run_one() { # $1 name, $2 binary, $3 run number
  reset_state
  /usr/bin/time -f "%e %U %S" -o "$WORK/t" "$2" run specs/backup-qcow2.yaml --quiet --var source="$IMG" \
    --var repo="$WORK/repo" --var disk=disk --report "$WORK/$1-$3.json" >/dev/null
  # wall, CPU (user + system), and the busy time of the changed-block map stage (where the plan, and
  # with it the check of the parent's chunks, is made)
  read -r wall user sys <"$WORK/t"
  map=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(s["busy_seconds"] for s in r["stages"] if s["kind"] in ("dirty-bitmap","full")))' "$WORK/$1-$3.json")
  echo "$1 $wall $(awk -v u="$user" -v s="$sys" 'BEGIN {print u + s}') $map" | tee -a "$WORK/times" >&2
}
for i in $(seq "$RUNS"); do
  if [ $((i % 2)) -eq 1 ]; then run_one old "$OLD" "$i"; run_one new "$NEW" "$i"; else run_one new "$NEW" "$i"; run_one old "$OLD" "$i"; fi
done

# Correctness, untimed: each build's incremental restores to the changed image.
for name in old new; do
  bin=$OLD; [ "$name" = new ] && bin=$NEW
  reset_state
  "$bin" run specs/backup-qcow2.yaml --quiet --var source="$IMG" --var repo="$WORK/repo" \
    --var disk=disk --report "$WORK/check.json" >/dev/null
  "$NEW" restore --repo "$WORK/repo" --snapshot latest --to "$WORK/restored.raw" --no-sync >/dev/null
  qemu-img compare -q -f raw -F qcow2 "$WORK/restored.raw" "$IMG" || { echo "$name: restore differs" >&2; exit 1; }
  rm -f "$WORK/restored.raw"
done

median() { # $1 name, $2 column
  awk -v k="$1" -v c="$2" '$1==k {print $c}' "$WORK/times" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
echo "| build | wall (s), each run | median wall (s) | median CPU (s) | median map stage busy (s) |"
echo "|---|---|---:|---:|---:|"
for name in old new; do
  echo "| $name | $(awk -v k=$name '$1==k {printf "%s ", $2}' "$WORK/times")| $(median $name 2) | $(median $name 3) | $(median $name 4) |"
done
echo
for col in 2:wall 3:CPU; do
  echo "new / old, median ${col#*:}: $(awk -v a="$(median new "${col%%:*}")" -v b="$(median old "${col%%:*}")" 'BEGIN {printf "%.3f", a / b}')"
done
echo "read by the incremental: $(json_num source_bytes_read "$WORK/new-1.json") bytes (new), $(json_num source_bytes_read "$WORK/old-1.json") bytes (old)"
