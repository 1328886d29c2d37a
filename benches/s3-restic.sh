#!/usr/bin/env bash
# restic's S3 backend against the test harness's Garage (one node on loopback, as the S3 tests use
# it): backup of one generated image into a new bucket, then its restore, checked with cmp. Prints
# one Markdown table: wall time, throughput and peak RSS (GNU time) of each step. The building block
# of the backflow-against-restic comparison on S3 (benches/s3.sh has the helpers).
#
#   bash benches/s3-restic.sh [SIZE] [KIND]     e.g. bash benches/s3-restic.sh 2G garage
# KIND: garage (default), garage-cluster, s3s-fs. Needs about 3x SIZE of free disk in $BENCH_DIR
# (default /var/tmp/backflow-s3-restic): the image, the store's copy, the restored file.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
KIND=${2:-garage}
WORK=${BENCH_DIR:-/var/tmp/backflow-s3-restic}

source benches/peers.sh
source benches/s3.sh
peers_setup
s3_store "$KIND"
IMG=$WORK/disk.img
echo "generating a $SIZE image" >&2
"$FX" image --size "$SIZE" --seed 1 "$IMG" >/dev/null
BYTES=$(stat -c %s "$IMG")
cat "$IMG" >/dev/null # restic reads from the page cache

restic_s3 restic restic "$IMG"

mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
echo "| restic 0.14 on $KIND, $(mib "$BYTES") MiB image | wall s | MiB/s | peak RSS MiB |"
echo "| --- | ---: | ---: | ---: |"
for step in backup restore; do
  secs=$(get "restic_$step" 2)
  rss=$(get "restic_$step" 3)
  awk -v s="$secs" -v r="$rss" -v b="$BYTES" -v step="$step" \
    'BEGIN { printf "| %s | %.1f | %.0f | %.0f |\n", step, s, b / 1048576 / s, r / 1024 }'
done
