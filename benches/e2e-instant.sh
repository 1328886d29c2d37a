#!/usr/bin/env bash
# Time to a running VM: instant recovery (`backflow instant-restore`, the VM runs on overlays of the
# restore point's NBD export) against a full restore followed by a start (`specs/restore-vm.yaml`
# with start=true), for the bootable test guest (`backflow_testkit::guest`, made by
# `backflow-test-guest`) on a SIZE qcow2 disk whose ext4 data partition holds a DATA image of
# `backflow-fixtures` (seed 1: text, binaries, compressed, duplicate and random files, holes), all
# in one run so that they compare as ratios on a noisy machine. The guest boots once, is backed up
# (backup-vm, freeze=off) into a local repository (and, with S3=1, a bucket on Garage: one node on
# loopback, the test harness's store), and is destroyed. Per repetition, in this order:
#   instant (local repository): from the command's start until the copy's console log shows the
#     boot line; also the RTO the command prints (until the domain runs); then `instant-restore
#     finish` to standalone qcow2 images while the guest runs (the time to independence: the
#     command's wall time and what it prints), then the moved domain is destroyed and undefined;
#   instant from Garage (S3=1): the same until the boot line, then `instant-restore discard`;
#   full restore + start (local repository): from restore-vm's start until the new domain's
#     console shows the boot line (again: the domain keeps the backed-up console paths, whose log
#     appends), then it is destroyed and undefined and its image removed.
# The guest runs under TCG where KVM cannot run Debian's kernel (docs/test-guest.md): its boot
# (12-50 s) is in both columns. Prints a Markdown table of the medians over RUNS repetitions (and
# each run's values) with the ratio (full restore + start) / instant, and writes it to a results
# file. Nothing is left: domains, recoveries and their exports, the work directory (trap).
#
#   bash benches/e2e-instant.sh [SIZE [DATA]]   default 2G 1536M; RUNS=3, S3=1,
#                                               BENCH_DIR=/var/tmp/backflow-instant-bench,
#                                               RESULTS=target/bench-results/e2e-instant-DATE.md
# Needs about 3x DATA of free disk at the peak (making the disk), then 3x DATA (the guest's image,
# the repositories, a restored or moved image). backflow is the release build without test hooks,
# copied into the work directory so that a `cargo test` elsewhere cannot swap it during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
DATA=${2:-1536M}
RUNS=${RUNS:-3}
S3=${S3:-1}
WORK=${BENCH_DIR:-/var/tmp/backflow-instant-bench}
RESULTS=${RESULTS:-target/bench-results/e2e-instant-$(date -u +%Y%m%dT%H%M%SZ).md}
# How long a boot may take before the run fails (TCG on a busy machine: up to a minute or two).
BOOT_TIMEOUT=${BOOT_TIMEOUT:-300}

source benches/peers.sh
source benches/s3.sh
# shellcheck disable=SC2119 # no extra tools
peers_setup
cargo build --release -q -p backflow-testkit --bin backflow-test-guest
TG=$PWD/target/release/backflow-test-guest
mkdir -p "$(dirname "$RESULTS")"
RESULTS=$(realpath "$RESULTS")
cp "$BF" "$WORK/backflow"
BF=$WORK/backflow
STATE=$WORK/instant
PREFIX=bf-instant-bench-$$
BOOT_LINE=$("$TG" boot-line)

# Everything this run may have made, whatever step it stopped at: the recoveries (their domains
# and exports), the domains of our prefix, the work directory.
cleanup() {
  local name
  for name in $(ls "$STATE" 2>/dev/null); do
    "$BF" instant-restore discard "$name" --state-dir "$STATE" >/dev/null 2>&1 || true
  done
  for name in $(virsh -q list --all --name 2>/dev/null | grep "^$PREFIX" || true); do
    virsh -q destroy "$name" >/dev/null 2>&1 || true
    virsh -q undefine "$name" --checkpoints-metadata >/dev/null 2>&1 \
      || virsh -q undefine "$name" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ "$S3" = 1 ]; then s3_store garage; fi

now() { date +%s.%N; }
# wait_line LOG COUNT: waits until LOG holds more than COUNT boot lines; prints the time then.
wait_line() {
  local log=$1 count=$2 start n
  start=$(now)
  while :; do
    n=$(grep -c -a "$BOOT_LINE" "$log" 2>/dev/null || true)
    [ "${n:-0}" -gt "$count" ] && break
    if awk -v s="$start" -v n="$(now)" -v t="$BOOT_TIMEOUT" 'BEGIN { exit !(n - s > t) }'; then
      echo "e2e-instant: no $BOOT_LINE in $log within $BOOT_TIMEOUT s; it shows:" >&2
      tail -c 2000 "$log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  now
}
lines_in() { grep -c -a "$BOOT_LINE" "$1" 2>/dev/null || true; }
record() { echo "$1 $2" >>"$WORK/times"; echo "  $1 $2" >&2; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# seconds_after TEXT WORD: the number after WORD in TEXT ("RTO 1.84 s" -> 1.84).
seconds_after() { grep -o "$2 [0-9.]* s" <<<"$1" | head -1 | awk '{ print $2 }'; }

echo "making the test guest: $SIZE disk, a $DATA fixture image in its data partition" >&2
"$FX" image --size "$DATA" --seed 1 "$WORK/data.img" >/dev/null
TMPDIR=$WORK "$TG" disk "$SIZE" "$WORK/guest.qcow2" --data "$WORK/data.img" >&2
rm -f "$WORK/data.img"
ORIG=$PREFIX-orig
"$TG" xml "$ORIG" "$WORK/guest.qcow2" "$WORK/console" >"$WORK/orig.xml"
virsh -q define "$WORK/orig.xml" >/dev/null
if grep -q "<domain type='kvm'" "$WORK/orig.xml"; then ACCEL=KVM; else ACCEL=TCG; fi
t0=$(now)
virsh -q start "$ORIG" >/dev/null
ORIG_BOOT=$(secs "$t0" "$(wait_line "$WORK/console/console.log" 0)")
echo "  booted in $ORIG_BOOT s" >&2

REPOS=("$WORK/repo")
[ "$S3" = 1 ] && REPOS+=("s3://$S3_BUCKET/instant")
IDS=()
for repo in "${REPOS[@]}"; do
  "$BF" init --repo "$repo" >/dev/null
  echo "backing up $ORIG into $repo" >&2
  t0=$(now)
  "$BF" run specs/backup-vm.yaml --quiet --var domain="$ORIG" --var repo="$repo" --var freeze=off \
    --report "$WORK/backup.json"
  echo "  $(secs "$t0" "$(now)") s" >&2
  IDS+=("$(sed -n 's/.*"snapshot": *"\([^"]*\)".*/\1/p' "$WORK/backup.json" | head -1)")
  [ -n "${IDS[-1]}" ] || { echo "e2e-instant: no snapshot in the backup's report" >&2; exit 1; }
done
STORED=$(du -sb "$WORK/repo" | cut -f1)
virsh -q destroy "$ORIG" >/dev/null
virsh -q undefine "$ORIG" --checkpoints-metadata >/dev/null
mkdir -p "$STATE" "$WORK/moved" "$WORK/restored"
chmod 755 "$STATE" "$WORK/moved" "$WORK/restored"

# instant NAME REPO ID: instant-restore until the boot line; records NAME_boot and NAME_rto.
instant() {
  local name=$1 repo=$2 id=$3 t0 out
  t0=$(now)
  out=$("$BF" instant-restore --repo "$repo" --snapshot "$id" --name "$PREFIX-$name" --no-network \
    --console-socket --state-dir "$STATE" 2>&1) || { echo "$out" >&2; exit 1; }
  record "${name}_boot" "$(secs "$t0" "$(wait_line "$STATE/$PREFIX-$name/console.log" 0)")"
  record "${name}_rto" "$(seconds_after "$out" RTO)"
}

LOADS=()
for r in $(seq 1 "$RUNS"); do
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  echo "repetition $r of $RUNS (load average ${LOADS[-1]})" >&2

  instant "local_$r" "${REPOS[0]}" "${IDS[0]}"
  t0=$(now)
  out=$("$BF" instant-restore finish "$PREFIX-local_$r" --to "$WORK/moved" --state-dir "$STATE" 2>&1) \
    || { echo "$out" >&2; exit 1; }
  record "local_${r}_finish" "$(secs "$t0" "$(now)")"
  record "local_${r}_independent" "$(seconds_after "$out" after)"
  virsh -q destroy "$PREFIX-local_$r" >/dev/null
  virsh -q undefine "$PREFIX-local_$r" >/dev/null
  rm -f "$WORK"/moved/*

  if [ "$S3" = 1 ]; then
    instant "garage_$r" "${REPOS[1]}" "${IDS[1]}"
    "$BF" instant-restore discard "$PREFIX-garage_$r" --state-dir "$STATE" >/dev/null
  fi

  name=$PREFIX-full-$r
  before=$(lines_in "$WORK/console/console.log")
  t0=$(now)
  "$BF" run specs/restore-vm.yaml --quiet --var repo="${REPOS[0]}" --var snapshot="${IDS[0]}" \
    --var to="$WORK/restored" --var name="$name" --var start=true
  record "full_${r}_restored" "$(secs "$t0" "$(now)")"
  record "full_${r}_boot" "$(secs "$t0" "$(wait_line "$WORK/console/console.log" "${before:-0}")")"
  virsh -q destroy "$name" >/dev/null
  virsh -q undefine "$name" >/dev/null
  rm -f "$WORK"/restored/*
done
LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")

# med KEY: the median over the repetitions of KEY_r (prints also each run's value).
med() {
  local r
  for r in $(seq 1 "$RUNS"); do get "${1/@/$r}" 2; done \
    | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
runs() {
  local r out=()
  for r in $(seq 1 "$RUNS"); do out+=("$(get "${1/@/$r}" 2)"); done
  local IFS=/
  echo "${out[*]}"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fx", a / b }'; }
GUEST_BYTES=$(stat -c %s "$WORK/guest.qcow2")
{
  echo "Time to a running VM, the bootable test guest ($SIZE disk, a $DATA fixture image in its data"
  echo "partition: a $((GUEST_BYTES >> 20)) MiB qcow2 image; local repository $((STORED >> 20)) MiB),"
  echo "medians of $RUNS (each run's values in the last column), $(nproc) cores, guest under $ACCEL"
  echo "(its first boot, from its own image: $ORIG_BOOT s), load average $(IFS=';'; echo "${LOADS[*]}")"
  echo "(before each repetition, and after)."
  echo
  echo "| path | until the domain runs | ratio | until the boot line | ratio | runs (boot line) |"
  echo "|---|---|---|---|---|---|"
  full_run=$(med "full_@_restored")
  full=$(med "full_@_boot")
  echo "| full restore + start (local) | $full_run s | 1.0x | $full s | 1.0x | $(runs "full_@_boot") |"
  rto=$(med "local_@_rto")
  inst=$(med "local_@_boot")
  echo "| instant-restore (local) | $rto s (RTO) | $(ratio "$full_run" "$rto") | $inst s | $(ratio "$full" "$inst") | $(runs "local_@_boot") |"
  if [ "$S3" = 1 ]; then
    rto=$(med "garage_@_rto")
    s3=$(med "garage_@_boot")
    echo "| instant-restore (Garage) | $rto s (RTO) | $(ratio "$full_run" "$rto") | $s3 s | $(ratio "$full" "$s3") | $(runs "garage_@_boot") |"
  fi
  echo
  echo "Time to independence (instant-restore finish to qcow2 images, local, while the guest runs):"
  echo "$(med "local_@_finish") s wall ($(runs "local_@_finish")), $(med "local_@_independent") s as it reports."
  echo
  echo "ratio: full restore + start / path (above 1: the path is sooner)."
} | tee "$RESULTS"
