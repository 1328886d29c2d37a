#!/usr/bin/env bash
# zstd (level 1, the default) against lz4 on one generated image: the same backup spec
# (specs/backup-image.yaml) with --var compressor=zstd and --var compressor=lz4, each into a fresh
# repository, then a restore of each (checked with cmp). Prints one Markdown table with wall time,
# CPU seconds (user + system, the process and its children), stored size and the lz4/zstd ratios.
#
#   bash benches/compressors.sh [SIZE]      default 2G; BENCH_DIR=/var/tmp/backflow-compressors
# Needs about 4x SIZE of free disk in $BENCH_DIR. One run of each, alternating on one machine:
# compare the ratios, not absolute times between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
WORK=${BENCH_DIR:-/var/tmp/backflow-compressors}

[ -x /usr/bin/time ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; }
cargo build --release -q -p backflow -p backflow-fixtures
BF=$PWD/target/release/backflow
FX=$PWD/target/release/backflow-fixtures
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

# measure NAME CMD...: appends "NAME wall_s cpu_s max_rss_kib" to $WORK/times.
measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/t" "$@" >"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log" >&2; exit 1; }
  awk -v n="$name" '{printf "%s %s %.2f %s\n", n, $1, $2 + $3, $4}' "$WORK/t" >>"$WORK/times"
}
get() { awk -v k="$1" '$1==k {print $'"$2"'}' "$WORK/times"; }

IMG=$WORK/disk.img
echo "generating a $SIZE image" >&2
"$FX" image --size "$SIZE" --seed 1 "$IMG" >/dev/null
BYTES=$(stat -c %s "$IMG")
cat "$IMG" >/dev/null   # both read from the page cache

for c in zstd lz4; do
  "$BF" init --repo "$WORK/$c" >/dev/null
  echo "backing up with $c" >&2
  measure "backup_$c" "$BF" run specs/backup-image.yaml --quiet --var source="$IMG" \
    --var repo="$WORK/$c" --var disk=disk --var compressor="$c"
  echo "size_$c $(du -sb "$WORK/$c" | cut -f1)" >>"$WORK/times"
done
for c in zstd lz4; do
  echo "restoring from $c" >&2
  sync
  measure "restore_$c" "$BF" restore --quiet --repo "$WORK/$c" --snapshot latest --to "$WORK/out.img" --no-sync
  cmp "$IMG" "$WORK/out.img"
  rm -f "$WORK/out.img"
done
echo "both restores are identical to the image (cmp)" >&2

mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
rate() { awk -v b="$BYTES" -v s="$1" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo
echo "Image: $SIZE generated (seed 1). Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
echo
echo "| compressor | backup wall | backup CPU | stored | restore wall (cached) | restore CPU |"
echo "|---|---|---|---|---|---|"
for c in zstd lz4; do
  echo "| $c | $(get backup_$c 2) s ($(rate "$(get backup_$c 2)") MiB/s) | $(get backup_$c 3) s | $(mib "$(get size_$c 2)") MiB | $(get restore_$c 2) s | $(get restore_$c 3) s |"
done
echo "| lz4 / zstd | $(ratio "$(get backup_lz4 2)" "$(get backup_zstd 2)") | $(ratio "$(get backup_lz4 3)" "$(get backup_zstd 3)") | $(ratio "$(get size_lz4 2)" "$(get size_zstd 2)") | $(ratio "$(get restore_lz4 2)" "$(get restore_zstd 2)") | $(ratio "$(get restore_lz4 3)" "$(get restore_zstd 3)") |"
