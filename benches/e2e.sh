#!/usr/bin/env bash
# End-to-end comparison on one generated image, all tools in the same run:
#   backflow (default settings), borg 1.2 (--compression lz4, no encryption), restic 0.14.
# Steps per tool: full backup, 5% of the image changed at scattered offsets, second backup,
# restore of the second restore point (checked with cmp). Prints one table (Markdown) with
# times, throughput, repository growth, peak memory (RSS) and backflow's ratios to the better peer,
# then backflow's peak memory on other image sizes.
#
#   bash benches/e2e.sh [SIZE] [OTHER_SIZES...]      e.g. bash benches/e2e.sh 2G 1G 4G
# The qcow2 incremental row (dirty bitmap, borg and restic on the qcow2 file): benches/e2e-qcow2.sh.
# Needs about 4x SIZE of free disk in $BENCH_DIR (default /var/tmp/backflow-e2e). Installs restic,
# borgbackup and GNU time from Debian when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
shift || true
OTHER_SIZES=("$@")
WORK=${BENCH_DIR:-/var/tmp/backflow-e2e}

source benches/peers.sh
peers_setup
IMG=$WORK/disk.img

echo "generating a $SIZE image" >&2
"$FX" image --size "$SIZE" --seed 1 "$IMG" >/dev/null
BYTES=$(stat -c %s "$IMG")
cat "$IMG" >/dev/null   # every tool reads from the page cache

# ---- full backups
"$BF" init --repo "$WORK/bf" >/dev/null
borg init --encryption=none "$WORK/borg"
restic init -q -r "$WORK/restic" >/dev/null
measure bf_full "$BF" run specs/backup-image.yaml --quiet --var source="$IMG" --var repo="$WORK/bf" --var disk=disk
measure borg_full borg create --compression lz4 "$WORK/borg::one" "$IMG"
measure restic_full restic -q -r "$WORK/restic" backup "$IMG"
for t in bf borg restic; do echo "${t}_size_full $(size_of "$WORK/$t")" >>"$WORK/times"; done

# ---- 5% change, second backups
"$FX" change --fraction 0.05 --seed 2 "$IMG" >&2
cat "$IMG" >/dev/null
cp --sparse=always "$IMG" "$WORK/at-second.img"
measure bf_incr "$BF" run specs/backup-image.yaml --quiet --var source="$IMG" --var repo="$WORK/bf" --var disk=disk
measure borg_incr borg create --compression lz4 "$WORK/borg::two" "$IMG"
measure restic_incr restic -q -r "$WORK/restic" backup "$IMG"
for t in bf borg restic; do echo "${t}_size_incr $(size_of "$WORK/$t")" >>"$WORK/times"; done

# ---- restores of the second restore point, each checked with cmp. Twice: "durable" ends when the
# data is on disk (backflow fsyncs; borg and restic do not, so `sync` follows them inside the timing),
# "cached" ends when the data is in the page cache (backflow --no-sync).
rm -f "$IMG"
restore_all() { # $1: durable or cached
  local mode=$1 nosync="" after=""
  [ "$mode" = cached ] && nosync=--no-sync
  [ "$mode" = durable ] && after="&& sync"
  rm -rf "$WORK/out-bf.img" "$WORK/out-borg" "$WORK/out-restic"; mkdir -p "$WORK/out-borg" "$WORK/out-restic"; sync
  measure bf_restore_$mode "$BF" restore --quiet --repo "$WORK/bf" --snapshot latest --to "$WORK/out-bf.img" $nosync
  sync
  measure borg_restore_$mode sh -c "cd '$WORK/out-borg' && borg extract --sparse '$WORK/borg::two' $after"
  sync
  measure restic_restore_$mode sh -c "restic -q -r '$WORK/restic' restore latest --target '$WORK/out-restic' $after"
  cmp "$WORK/at-second.img" "$WORK/out-bf.img"
  cmp "$WORK/at-second.img" "$(find "$WORK/out-borg" -name disk.img)"
  cmp "$WORK/at-second.img" "$(find "$WORK/out-restic" -name disk.img)"
}
restore_all cached
restore_all durable
echo "all restores are identical to the image (cmp)" >&2

mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
rate() { awk -v b="$BYTES" -v s="$1" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }
echo
echo "Image: $SIZE generated (seed 1), 5% changed (seed 2). Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
echo
echo "| tool | full backup | 2nd backup (5% changed) | restore, durable | restore, cached | repo after full | growth after change | peak RSS full / 2nd / restore |"
echo "|---|---|---|---|---|---|---|---|"
for t in bf borg restic; do
  name=$t; [ $t = bf ] && name=backflow
  full=$(get ${t}_full 2); incr=$(get ${t}_incr 2); rest=$(get ${t}_restore_durable 2); cached=$(get ${t}_restore_cached 2)
  sfull=$(get ${t}_size_full 2); sincr=$(get ${t}_size_incr 2)
  echo "| $name | ${full} s ($(rate "$full") MiB/s) | ${incr} s ($(rate "$incr") MiB/s) | ${rest} s ($(rate "$rest") MiB/s) | ${cached} s ($(rate "$cached") MiB/s) | $(mib "$sfull") MiB | $(mib $((sincr - sfull))) MiB | $(( $(get ${t}_full 3) / 1024 )) / $(( $(get ${t}_incr 3) / 1024 )) / $(( $(get ${t}_restore_cached 3) / 1024 )) MiB |"
done
ratio() { # backflow's speed-up over the better (faster) peer for step $1
  awk -v b="$(get bf_$1 2)" -v x="$(get borg_$1 2)" -v y="$(get restic_$1 2)" 'BEGIN {m = x < y ? x : y; printf "%.1fx", m / b}'
}
growth() { echo $(( $(get ${1}_size_incr 2) - $(get ${1}_size_full 2) )); }
gb=$(growth bf); gborg=$(growth borg); gres=$(growth restic)
best=$(( gborg < gres ? gborg : gres ))
echo
echo "backflow vs the better peer: full $(ratio full) faster, 2nd backup $(ratio incr) faster, restore $(ratio restore_durable) faster durable, $(ratio restore_cached) cached; growth after the change $(awk -v a=$gb -v b=$best 'BEGIN {printf "%.2f", a / b}') of the better peer's."

for other in "${OTHER_SIZES[@]}"; do
  rm -rf "$WORK/bf" "$WORK/mem"; mkdir -p "$WORK/mem"
  "$FX" image --size "$other" --seed 3 "$WORK/mem/disk.img" >/dev/null
  "$BF" init --repo "$WORK/bf" >/dev/null
  measure mem_full_$other "$BF" run specs/backup-image.yaml --quiet --var source="$WORK/mem/disk.img" --var repo="$WORK/bf" --var disk=disk
  "$FX" change --fraction 0.05 --seed 4 "$WORK/mem/disk.img" >/dev/null
  measure mem_incr_$other "$BF" run specs/backup-image.yaml --quiet --var source="$WORK/mem/disk.img" --var repo="$WORK/bf" --var disk=disk
  measure mem_restore_$other "$BF" restore --quiet --repo "$WORK/bf" --snapshot latest --to "$WORK/mem/out.img"
  cmp "$WORK/mem/disk.img" "$WORK/mem/out.img"
  echo "backflow on a $other image: peak RSS full $(( $(get mem_full_$other 3) / 1024 )) MiB, 2nd $(( $(get mem_incr_$other 3) / 1024 )) MiB, restore $(( $(get mem_restore_$other 3) / 1024 )) MiB (restore identical)"
  rm -rf "$WORK/mem"
done
