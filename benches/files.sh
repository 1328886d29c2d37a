#!/usr/bin/env bash
# File-level restore against a full restore and a mount (docs/files.md): on a GPT disk whose
# partition 2 is an ext4 of /usr/share/doc (about 7,000 entries), times
#   files ls -R    `backflow files ls -R 2:/` (every entry with its stat)
#   files get dir  `backflow files get 2:/doc/SUBDIR` of one package's directory
#   restore+mount  `backflow restore` of the whole disk, a read-only loop mount of partition 2,
#                  `cp -a` of the same directory, umount
# each once (the appliance's start dominates `files`; see docs/files.md for KVM against TCG).
#
#   bash benches/files.sh [DISK_SIZE_MIB]      default 1024; needs root (loop mount, owners)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
WORK=${BENCH_DIR:-/var/tmp/backflow-files-bench}
SUBDIR=${SUBDIR:-bash}
cargo build --release -q -p backflow
BF=$PWD/target/release/backflow
KENV=${BACKFLOW_TOOLS:-/opt/backflow-tools}/kernel/current/env
if [ -z "${SUPERMIN_KERNEL:-}" ] && [ -f "$KENV" ]; then set -a; . "$KENV"; set +a; fi

rm -rf "$WORK"; mkdir -p "$WORK/tree"
trap 'umount "$WORK/mnt" 2>/dev/null || true; rm -rf "$WORK"' EXIT
cp -a /usr/share/doc "$WORK/tree/doc"
P2=$((SIZE_MIB - 18))
truncate -s "${P2}M" "$WORK/p2.img"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/p2.img"
truncate -s "${SIZE_MIB}M" "$WORK/vda.img"
sgdisk -o -n 1:2048:+16M -n 2:0:0 "$WORK/vda.img" >/dev/null
START=$(sgdisk -i 2 "$WORK/vda.img" | awk '/First sector/ {print $3}')
dd if="$WORK/p2.img" of="$WORK/vda.img" bs=1M seek=$((START / 2048)) conv=notrunc,sparse status=none
rm "$WORK/p2.img"
"$BF" init --repo "$WORK/repo" >/dev/null
"$BF" run specs/backup-image.yaml --var source="$WORK/vda.img" --var repo="$WORK/repo" \
  --var disk=vda --var name=vda --quiet

now() { date +%s.%N; }
t0=$(now)
entries=$("$BF" files ls --repo "$WORK/repo" -R 2:/ | wc -l)
t1=$(now)
"$BF" files get --repo "$WORK/repo" "2:/doc/$SUBDIR" --to "$WORK/out-files" 2>/dev/null
t2=$(now)
"$BF" restore --repo "$WORK/repo" --to "$WORK/restored.raw" --quiet
mkdir -p "$WORK/mnt" "$WORK/out-mount"
mount -o loop,ro,offset=$((START * 512)) "$WORK/restored.raw" "$WORK/mnt"
cp -a "$WORK/mnt/doc/$SUBDIR" "$WORK/out-mount/"
umount "$WORK/mnt"
t3=$(now)
diff -r "$WORK/out-files/$SUBDIR" "$WORK/out-mount/$SUBDIR" >/dev/null
echo "| way | seconds |"
echo "|---|---:|"
printf '| files ls -R (%s entries) | %.1f |\n' "$entries" "$(echo "$t1 - $t0" | bc)"
printf '| files get 2:/doc/%s | %.1f |\n' "$SUBDIR" "$(echo "$t2 - $t1" | bc)"
printf '| restore + loop mount + cp -a | %.1f |\n' "$(echo "$t3 - $t2" | bc)"
