#!/usr/bin/env bash
# End-to-end comparison on running libvirt domains: backflow against virtnbdbackup, both through
# libvirt's backup API (pull mode: checkpoints, an NBD export of the disk, for an incremental the
# dirty bitmap since the tool's previous checkpoint), in the same run, one backup job at a time.
#   backflow        specs/backup-vm.yaml --var domain=NAME --var repo=REPO
#   virtnbdbackup   -l full / -l inc into one output directory (its defaults: stream format, no
#                   compression; VNB_FLAGS="-z" adds its lz4 compression)
# Each tool backs up its own domain, bench-vm-PID-vnb and bench-vm-PID-bf, twins: same image copy,
# same change. One domain for both does not work: virtnbdbackup refuses any backup level
# ("Foreign checkpoint found: [backflow.…]", exit 1) while the domain holds a checkpoint whose
# name does not contain "virtnbdbackup".
# Steps: the SIZE image from backflow-fixtures (seed 1, as e2e-qcow2.sh) converted to qcow2, one
# copy per domain, attached as vda (virtio) of a domain with no OS (SeaBIOS idles: the guest
# writes nothing by itself); full backup by virtnbdbackup, then by backflow; 5% of each disk
# rewritten through the guest's virtio device (QEMU monitor, qemu-io: the same 1638 scattered
# 64 KiB blocks and byte patterns as e2e-qcow2.sh's change, seed CHANGE_SEED); incremental by
# virtnbdbackup, then by backflow. Then (not timed) the domains are stopped, and virtnbdrestore and
# backflow restore their latest point, each compared with its disk (qemu-img compare). Prints a
# Markdown table.
#
#   bash benches/e2e-vm.sh [SIZE]            default 2G
#   BACKFLOW=0 bash benches/e2e-vm.sh        virtnbdbackup alone (e.g. before specs/backup-vm.yaml)
#   KEEP=1 bash benches/e2e-vm.sh            keep $BENCH_DIR (images, logs) after the run
# Needs libvirt and QEMU (scripts/setup.sh installs them) and a libvirtd at qemu:///system
# (started by scripts/libvirtd.sh when none answers), about 3x SIZE of free disk in $BENCH_DIR
# (default /var/tmp/backflow-e2e-vm). Installs virtnbdbackup (with virtnbdrestore), restic,
# borgbackup and GNU time from Debian when they are missing (peers.sh). The domains it defines, and
# only those, are destroyed and undefined (with their checkpoints' metadata) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
CHANGE_SEED=${CHANGE_SEED:-2}
BACKFLOW=${BACKFLOW:-1}
VNB_FLAGS=${VNB_FLAGS:-}
WORK=${BENCH_DIR:-/var/tmp/backflow-e2e-vm}
URI=qemu:///system
SPEC=specs/backup-vm.yaml
PREFIX=bench-vm-$$
T0=$(date +%s)
LOAD0=$(cut -d' ' -f1 /proc/loadavg)

if [ "$BACKFLOW" = 1 ] && [ ! -f "$SPEC" ]; then
  echo "e2e-vm: $SPEC does not exist (yet): the backflow half cannot run." >&2
  echo "e2e-vm: BACKFLOW=0 bash $0 ${1:-} measures virtnbdbackup alone." >&2
  exit 1
fi

source benches/peers.sh
peers_setup virtnbdbackup:virtnbdbackup qemu-img:qemu-utils virsh:libvirt-clients
virsh -c "$URI" version >/dev/null 2>&1 || bash scripts/libvirtd.sh start
v() { virsh -q -c "$URI" "$@"; }

DEFINED=()
cleanup() {
  local d
  for d in "${DEFINED[@]}"; do
    v destroy "$d" >/dev/null 2>&1 || true
    v undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || v undefine "$d" >/dev/null 2>&1 || true
    rm -f "/var/log/libvirt/qemu/$d.log"
  done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

TOOLS=(vnb); [ "$BACKFLOW" = 1 ] && TOOLS+=(bf)
# The image directory must let libvirt-qemu through (libvirt chowns the image, not its directory).
chmod 755 "$WORK"
echo "generating a $SIZE image, converting it to qcow2 (one copy per tool)" >&2
"$FX" image --size "$SIZE" --seed 1 "$WORK/disk.raw" >/dev/null
BYTES=$(stat -c %s "$WORK/disk.raw")
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/vnb.qcow2"
rm "$WORK/disk.raw"
[ "$BACKFLOW" = 1 ] && cp "$WORK/vnb.qcow2" "$WORK/bf.qcow2"
QCOW2_FULL=$(stat -c %s "$WORK/vnb.qcow2")

# ---- the domains: no OS, no NIC, no graphics, no <cpu> (host-model aborts QEMU here); KVM when
# it starts, else TCG.
domain_xml() { # $1: name, $2: image, $3: kvm or qemu
  cat <<EOF
<domain type='$3'>
  <name>$1</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}
start_domain() { # $1: tool
  local dom=$PREFIX-$1 kind
  for kind in kvm qemu; do
    [ $kind = kvm ] && [ ! -e /dev/kvm ] && continue
    domain_xml "$dom" "$WORK/$1.qcow2" $kind >"$WORK/$1.xml"
    v define "$WORK/$1.xml" >/dev/null
    DEFINED+=("$dom")
    if v start "$dom" >/dev/null 2>"$WORK/start.err"; then KIND=$kind; return; fi
    v undefine "$dom" >/dev/null
  done
  cat "$WORK/start.err" >&2; echo "e2e-vm: domain $dom does not start" >&2; exit 1
}
for t in "${TOOLS[@]}"; do
  start_domain $t
  echo "domain $PREFIX-$t runs ($KIND), vda = $WORK/$t.qcow2" >&2
  cat "$WORK/$t.qcow2" >/dev/null   # the tools read through QEMU from the page cache
done

# ---- the change: the blocks and patterns of e2e-qcow2.sh (64-bit LCG, seed CHANGE_SEED), written
# through the guest device so that the domain's dirty bitmaps record them. One virsh session for
# all of them (commands on stdin): one qemu-monitor-command per 64 KiB write, then a flush.
DEV=/machine/peripheral/virtio-disk0/virtio-backend
change_blocks "$BYTES" "$CHANGE_SEED" >"$WORK/change.blocks"
while read -r block pattern; do
  echo "qemu-monitor-command DOM --hmp 'qemu-io -d $DEV \"write -q -P $pattern $((block * BLOCK)) $BLOCK\"'"
done <"$WORK/change.blocks" >"$WORK/change.virsh"
echo "qemu-monitor-command DOM --hmp 'qemu-io -d $DEV \"flush\"'" >>"$WORK/change.virsh"
change() { # $1: tool, whose domain gets the change
  echo "rewriting $WANT blocks of 64 KiB ($((WANT * BLOCK / 1048576)) MiB) through the virtio device of $PREFIX-$1" >&2
  local t=$SECONDS
  # An HMP error still exits 0 with text in the reply: any output but virsh's echo of the
  # commands ("virsh # ...") is a failure.
  sed "s/^qemu-monitor-command DOM /qemu-monitor-command $PREFIX-$1 /" "$WORK/change.virsh" | v >"$WORK/change.out" 2>&1
  if grep -v '^virsh # ' "$WORK/change.out" | grep -q '[^[:space:]]'; then
    grep -v '^virsh # ' "$WORK/change.out" | head -5 >&2; echo "e2e-vm: a monitor write failed" >&2; exit 1
  fi
  CHANGE_SECONDS=$((SECONDS - t))
}

vnb() { # $1: name of the measurement, $2: level
  # No guest agent in this domain: virtnbdbackup warns that it cannot freeze and goes on.
  sync   # no tool pays for the write-back of what came before it (image copies, the other's repo)
  # shellcheck disable=SC2086
  measure "$1" virtnbdbackup -U "$URI" -d "$PREFIX-vnb" -l "$2" -o "$WORK/vnb" -S "$WORK" -n $VNB_FLAGS
  # virtnbdbackup does not fsync its output (backflow fsyncs its packs, index and manifest before
  # it reports success): the time to make it durable is shown next to its own.
  measure "$1_sync" sync
}
bf() { # $1: name of the measurement
  sync
  measure "$1" "$BF" run "$SPEC" --quiet --var domain="$PREFIX-bf" --var repo="$WORK/bf" --report "$WORK/$1.json"
}
sizes() { for t in "${TOOLS[@]}"; do echo "${t}_size_$1 $(size_of "$WORK/$t")" >>"$WORK/times"; done; }

# ---- full backups, one job at a time (libvirt runs one backup job per domain; here two domains,
# but one job at a time keeps the two tools from sharing the CPUs)
LOAD1=$(cut -d' ' -f1 /proc/loadavg)
[ "$BACKFLOW" = 1 ] && "$BF" init --repo "$WORK/bf" >/dev/null
echo "full backups" >&2
vnb vnb_full full
[ "$BACKFLOW" = 1 ] && bf bf_full
sizes full

for t in "${TOOLS[@]}"; do change $t; done

echo "incremental backups" >&2
vnb vnb_incr inc
[ "$BACKFLOW" = 1 ] && bf bf_incr
sizes incr

# ---- restore checks (not timed): each tool's latest point against its disk. The domains are
# stopped first: QEMU writes the image's qcow2 metadata out when it closes, and `qemu-img compare
# -U` of a running domain's image saw stale metadata here even after a guest flush (the first
# changed block read as before the change), while the restored image matched the stopped disk.
echo "restore checks (domains stopped first)" >&2
for t in "${TOOLS[@]}"; do v destroy "$PREFIX-$t" >/dev/null; done
mkdir "$WORK/vnb-out"
virtnbdrestore -i "$WORK/vnb" -o "$WORK/vnb-out" >"$WORK/vnb-restore.log" 2>&1 || { cat "$WORK/vnb-restore.log" >&2; exit 1; }
restored=$(find "$WORK/vnb-out" -maxdepth 1 -type f ! -name '*.xml' | head -1)
# virtnbdrestore ends its qemu-nbd without waiting: the image stays locked for a moment.
for _ in $(seq 50); do
  qemu-img compare "$restored" "$WORK/vnb.qcow2" >"$WORK/compare.out" 2>&1 && break
  grep -q 'lock' "$WORK/compare.out" || { cat "$WORK/compare.out" >&2; exit 1; }
  sleep 0.2
done
grep -q identical "$WORK/compare.out" || { cat "$WORK/compare.out" >&2; exit 1; }
echo "virtnbdrestore's latest point is identical to the disk (qemu-img compare)" >&2
rm -rf "$WORK/vnb-out"
if [ "$BACKFLOW" = 1 ]; then
  "$BF" restore --quiet --repo "$WORK/bf" --snapshot latest --disk vda --to "$WORK/bf-out.raw" --no-sync
  qemu-img compare -q -f raw -F qcow2 "$WORK/bf-out.raw" "$WORK/bf.qcow2"
  echo "backflow's latest point is identical to the disk (qemu-img compare)" >&2
  rm -f "$WORK/bf-out.raw"
fi

# The tools' warnings (e.g. no guest agent to freeze file systems), for the record
grep -h 'WARN' "$WORK"/vnb_full.log "$WORK"/vnb_incr.log | sed 's/^/virtnbdbackup: /' | sort -u >&2 || true
if [ "$BACKFLOW" = 1 ]; then
  sed -n '/"warnings"/,/\]/p' "$WORK"/bf_full.json "$WORK"/bf_incr.json | grep -v '"warnings"\|^ *\],\?$' | sed 's/^ */backflow: /' | sort -u >&2 || true
fi

# ---- the table
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
rate() { awk -v b="$BYTES" -v s="$1" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo
echo "Domains: one per tool ($KIND), one virtio disk (vda) holding the $SIZE image generated with seed 1 as qcow2 ($(mib "$QCOW2_FULL") MiB file); 5% rewritten through the guest device between the two backups, the same on both ($WANT writes of 64 KiB, seed $CHANGE_SEED, ${CHANGE_SECONDS} s per domain through one virsh session). virtnbdbackup $(virtnbdbackup -V 2>&1 | tail -1) (flags: -l full / -l inc -n${VNB_FLAGS:+ $VNB_FLAGS}). Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $LOAD0 at the start, $LOAD1 before the first backup, $(cut -d' ' -f1 /proc/loadavg) at the end."
echo
echo "| tool | full backup (MiB/s of the disk) | incremental (5% changed) | incr / full | repo after full | growth after incr | peak RSS full / incr |"
echo "|---|---|---|---:|---|---|---|"
for t in "${TOOLS[@]}"; do
  name=virtnbdbackup; [ $t = bf ] && name=backflow
  full=$(get ${t}_full 2); incr=$(get ${t}_incr 2)
  sfull=$(get ${t}_size_full 2); sincr=$(get ${t}_size_incr 2)
  if [ $t = vnb ]; then
    full_s="${full} s + $(get vnb_full_sync 2) s sync"; incr_s="${incr} s + $(get vnb_incr_sync 2) s sync"
  else
    full_s="${full} s"; incr_s="${incr} s"
  fi
  echo "| $name | $full_s ($(rate "$full") MiB/s) | $incr_s | $(awk -v a="$incr" -v b="$full" 'BEGIN {printf "%.3f", a / b}') | $(mib "$sfull") MiB | $(mib $((sincr - sfull))) MiB | $(( $(get ${t}_full 3) / 1024 )) / $(( $(get ${t}_incr 3) / 1024 )) MiB |"
done
if [ "$BACKFLOW" = 1 ]; then
  echo
  plus() { awk -v a="$1" -v b="$2" 'BEGIN {print a + b}'; }
  echo "backflow / virtnbdbackup: full time $(div "$(get bf_full 2)" "$(get vnb_full 2)") ($(div "$(get bf_full 2)" "$(plus "$(get vnb_full 2)" "$(get vnb_full_sync 2)")") against virtnbdbackup + sync), incremental time $(div "$(get bf_incr 2)" "$(get vnb_incr 2)") ($(div "$(get bf_incr 2)" "$(plus "$(get vnb_incr 2)" "$(get vnb_incr_sync 2)")") + sync), peak RSS full $(div "$(get bf_full 3)" "$(get vnb_full 3)") / incr $(div "$(get bf_incr 3)" "$(get vnb_incr 3)"), repo after full $(div "$(get bf_size_full 2)" "$(get vnb_size_full 2)"), growth after incr $(div $(( $(get bf_size_incr 2) - $(get bf_size_full 2) )) $(( $(get vnb_size_incr 2) - $(get vnb_size_full 2) )))."
  echo
  echo "Read by backflow's incremental: $(mib "$(json_num source_bytes_read "$WORK/bf_incr.json")") MiB (full: $(mib "$(json_num source_bytes_read "$WORK/bf_full.json")") MiB); virtnbdbackup's incremental data file: $(mib "$(stat -c %s "$WORK"/vnb/vda.inc.*.data)") MiB (full: $(mib "$(stat -c %s "$WORK"/vnb/vda.full.data)") MiB)."
fi
echo
echo "(script ran $(( $(date +%s) - T0 )) s, set-up and restore checks included)"
