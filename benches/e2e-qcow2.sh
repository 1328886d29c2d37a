#!/usr/bin/env bash
# End-to-end comparison on a qcow2 image, all tools in the same run: the incremental row.
#   backflow  specs/backup-qcow2.yaml (a private qemu-nbd; with --var bitmap=NAME a persistent
#             dirty bitmap in the qcow2 says what changed since the last backup)
#   borg 1.2  (--compression lz4, no encryption) and restic 0.14, backing up the qcow2 as a file
# Steps: the SIZE image from backflow-fixtures (seed 1) converted to qcow2; full backup by each
# tool; 5% of the disk rewritten through qemu-io (scattered 64 KiB-aligned extents, a byte pattern
# each, from a fixed seed, all in one qemu-io run so QEMU updates the bitmap as a guest's writes
# would); second backup by each tool. backflow's second restore point is then restored and
# compared with the image (qemu-img compare, not timed). Prints a Markdown table with the times,
# the second/full ratio (the target for backflow is <= 0.10), the bytes the second backup read,
# repository sizes, and backflow's ratios to the better peer.
#
#   bash benches/e2e-qcow2.sh [SIZE]               default 2G
#   BITMAP= bash benches/e2e-qcow2.sh              tracking off (`--var bitmap=`): the second
#                                                  backup reads every allocated cluster again
# Needs about 3x SIZE of free disk in $BENCH_DIR (default /var/tmp/backflow-e2e-qcow2). Installs
# restic, borgbackup and GNU time from Debian when they are missing.
#
# virtnbdbackup does not appear: it backs up libvirt domains (checkpoints, pull-mode backup
# export), not offline images; it comes with the libvirt issue.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
BITMAP=${BITMAP-backflow}
CHANGE_SEED=${CHANGE_SEED:-2}
WORK=${BENCH_DIR:-/var/tmp/backflow-e2e-qcow2}

source benches/peers.sh
peers_setup qemu-img:qemu-utils
IMG=$WORK/disk.qcow2

bf_backup() { # $1: name of the measurement
  # An empty bitmap turns tracking off (the spec's default is `backflow`).
  local vars=(--var source="$IMG" --var repo="$WORK/bf" --var disk=disk --var bitmap="$BITMAP")
  measure "$1" "$BF" run specs/backup-qcow2.yaml --quiet "${vars[@]}" --report "$WORK/$1.json"
}

echo "generating a $SIZE image, converting it to qcow2" >&2
"$FX" image --size "$SIZE" --seed 1 "$WORK/disk.raw" >/dev/null
BYTES=$(stat -c %s "$WORK/disk.raw")
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$IMG"
rm "$WORK/disk.raw"
cat "$IMG" >/dev/null   # every tool reads from the page cache
QCOW2_FULL=$(stat -c %s "$IMG")

# ---- full backups
"$BF" init --repo "$WORK/bf" >/dev/null
borg init --encryption=none "$WORK/borg"
restic init -q -r "$WORK/restic" >/dev/null
bf_backup bf_full
measure borg_full borg create --compression lz4 "$WORK/borg::one" "$IMG"
measure restic_full restic -q -r "$WORK/restic" backup "$IMG"
for t in bf borg restic; do echo "${t}_size_full $(size_of "$WORK/$t")" >>"$WORK/times"; done

# ---- 5% of the disk rewritten: distinct 64 KiB blocks, a non-zero byte pattern each (peers.sh)
change_blocks "$BYTES" "$CHANGE_SEED" >"$WORK/change.blocks"
commands=()
while read -r block pattern; do
  commands+=(-c "write -q -P $pattern $((block * BLOCK)) $BLOCK")
done <"$WORK/change.blocks"
echo "rewriting $WANT blocks of 64 KiB ($((WANT * BLOCK / 1048576)) MiB) with qemu-io" >&2
qemu-io -f qcow2 "${commands[@]}" "$IMG" >/dev/null
qemu-img convert -f qcow2 -O raw "$IMG" "$WORK/at-second.raw"   # for the restore check
cat "$IMG" >/dev/null
QCOW2_INCR=$(stat -c %s "$IMG")

# ---- second backups
bf_backup bf_incr
measure borg_incr borg create --compression lz4 "$WORK/borg::two" "$IMG"
measure restic_incr restic -q -r "$WORK/restic" backup "$IMG"
for t in bf borg restic; do echo "${t}_size_incr $(size_of "$WORK/$t")" >>"$WORK/times"; done

# ---- backflow's second restore point restores identical (not timed)
"$BF" restore --quiet --repo "$WORK/bf" --snapshot latest --to "$WORK/out.raw" --no-sync
qemu-img compare -q -f raw -F raw "$WORK/at-second.raw" "$WORK/out.raw"
echo "backflow's second restore point restores identical to the image (qemu-img compare)" >&2

mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
rate() { awk -v b="$BYTES" -v s="$1" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }
BF_READ_FULL=$(json_num source_bytes_read "$WORK/bf_full.json")
BF_READ_INCR=$(json_num source_bytes_read "$WORK/bf_incr.json")
echo
if [ -n "$BITMAP" ]; then how="dirty bitmap \`$BITMAP\`"; else how="no bitmap (--var bitmap= : every allocated cluster read again)"; fi
echo "Image: $SIZE generated (seed 1) as qcow2 ($(mib "$QCOW2_FULL") MiB file), 5% rewritten through qemu-io (seed $CHANGE_SEED; file then $(mib "$QCOW2_INCR") MiB). backflow: specs/backup-qcow2.yaml, $how. Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
echo
echo "| tool | full backup | 2nd backup (5% changed) | 2nd / full | read by the 2nd | repo after full | growth after change | peak RSS full / 2nd |"
echo "|---|---|---|---:|---|---|---|---|"
for t in bf borg restic; do
  name=$t; [ $t = bf ] && name=backflow
  full=$(get ${t}_full 2); incr=$(get ${t}_incr 2)
  sfull=$(get ${t}_size_full 2); sincr=$(get ${t}_size_incr 2)
  if [ $t = bf ]; then read2="$(mib "$BF_READ_INCR") MiB (full: $(mib "$BF_READ_FULL") MiB)"; else read2="the whole file ($(mib "$QCOW2_INCR") MiB)"; fi
  echo "| $name | ${full} s ($(rate "$full") MiB/s) | ${incr} s ($(rate "$incr") MiB/s) | $(awk -v a="$incr" -v b="$full" 'BEGIN {printf "%.3f", a / b}') | $read2 | $(mib "$sfull") MiB | $(mib $((sincr - sfull))) MiB | $(( $(get ${t}_full 3) / 1024 )) / $(( $(get ${t}_incr 3) / 1024 )) MiB |"
done
ratio() { # backflow's speed-up over the better (faster) peer for step $1
  awk -v b="$(get bf_$1 2)" -v x="$(get borg_$1 2)" -v y="$(get restic_$1 2)" 'BEGIN {m = x < y ? x : y; printf "%.1fx", m / b}'
}
growth() { echo $(( $(get ${1}_size_incr 2) - $(get ${1}_size_full 2) )); }
gb=$(growth bf); gborg=$(growth borg); gres=$(growth restic)
best=$(( gborg < gres ? gborg : gres ))
verdict=$(awk -v a="$(get bf_incr 2)" -v b="$(get bf_full 2)" 'BEGIN {print (a / b <= 0.10) ? "meets" : "misses"}')
echo
echo "backflow: 2nd/full $(awk -v a="$(get bf_incr 2)" -v b="$(get bf_full 2)" 'BEGIN {printf "%.3f", a / b}') ($verdict the <= 0.10 target); vs the better peer: full $(ratio full) faster, 2nd backup $(ratio incr) faster; growth after the change $(awk -v a=$gb -v b=$best 'BEGIN {printf "%.2f", a / b}') of the better peer's."
