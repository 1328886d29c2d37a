#!/usr/bin/env bash
# The chunk-size trade-off on one generated image: for each chunk size, full backup time, time of the
# backup after a 5% change, repository size after the full backup and growth after the change,
# durable restore time. Decides the repository default (DEFAULT_CHUNK_SIZE).
#   bash benches/chunk-size.sh [SIZE] [CHUNK_SIZES...]     e.g. bash benches/chunk-size.sh 2G 64K 128K 256K 1M
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
shift || true
CHUNKS=("$@")
[ ${#CHUNKS[@]} -gt 0 ] || CHUNKS=(64K 128K 256K 1M)
WORK=${BENCH_DIR:-/var/tmp/backflow-chunks}
cargo build --release -q -p backflow -p backflow-fixtures
BF=$PWD/target/release/backflow
FX=$PWD/target/release/backflow-fixtures
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
secs() { local s; s=$(date +%s.%N); "$@" >/dev/null; awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'; }
echo "| chunk size | full backup | 2nd backup (5% changed) | repo after full | growth after change | restore (durable) |"
echo "|---|---|---|---|---|---|"
for c in "${CHUNKS[@]}"; do
  "$FX" image --size "$SIZE" --seed 1 "$WORK/disk.img" >/dev/null
  cat "$WORK/disk.img" >/dev/null
  "$BF" init --repo "$WORK/repo" --chunk-size "$c" >/dev/null
  run() { "$BF" run specs/backup-image.yaml --quiet --var source="$WORK/disk.img" --var repo="$WORK/repo" --var disk=disk; }
  full=$(secs run)
  s1=$(du -sb "$WORK/repo" | cut -f1)
  "$FX" change --fraction 0.05 --seed 2 "$WORK/disk.img" >/dev/null
  incr=$(secs run)
  s2=$(du -sb "$WORK/repo" | cut -f1)
  sync
  rest=$(secs "$BF" restore --quiet --repo "$WORK/repo" --to "$WORK/out.img")
  cmp "$WORK/disk.img" "$WORK/out.img"
  echo "| $c | $full s | $incr s | $((s1 >> 20)) MiB | $(((s2 - s1) >> 20)) MiB | $rest s |"
  rm -rf "$WORK/repo" "$WORK/out.img" "$WORK/disk.img"
done
