#!/usr/bin/env bash
# Backup jobs over a cluster (issue 14), on the three-host lab of scripts/cluster.sh (three hosts,
# each a set of namespaces with its own libvirtd and sshd, Garage as the shared repository; see
# docs/cluster-lab.md), in one run so that the cases compare as ratios on a noisy machine:
#
#   Part 1, eight VMs: the wall time of `backflow job run` backing up the same eight VMs
#     3 hosts     spread 3/3/2 over h1..h3, each backed up by its own host's worker (max_vms 2
#                 each, the lab's setting: 6 at once in all);
#     1 host      the same data on eight VMs that all run on h1, the same cluster file (h1's worker
#                 takes 2 at once);
#     1 host x6   the same, with h1's max_vms at 6: as many at once as the three hosts together,
#                 which separates the number of hosts from the parallelism.
#   Part 2, the fallback: one VM of FALLBACK_MIB on h2, a full backup by h2's own worker (NBD on a
#     unix socket: `local`) against one by another host's worker when h2's is disabled in a copy of
#     the cluster file (NBD on TCP with TLS: `nbd_tls`); the session record proves which path ran.
#
# Every VM's disk is a qcow2 (cluster.sh add-vm converts a raw image written once here) of MIB
# MiB: the first half pseudo-random (/dev/urandom), the next quarter text lines naming the VM and
# their number (compressible, no chunk alike), the last quarter zeros (unallocated in the qcow2).
# Each of the eight disks is distinct, so nothing deduplicates across VMs; the "1 host" VMs hold
# the same bytes as the "3 hosts" ones. The fallback VM's disk: half random, half text, no zeros.
# The VMs run no OS (SeaBIOS idles), so the disks do not change.
#
# Per round, in this order: 3 hosts, 1 host, 1 host x6, fallback local, fallback over TLS; each job
# into a fresh repository prefix (s3://backflow/bench-CASE-ROUND, `backflow init` first), so every
# backup is a full one. Each `job run` runs under GNU time (wall, the controller's peak RSS); the
# workers' peak RSS is their VmHWM, sampled every 0.5 s; Garage's CPU time from /proc; the setup
# (checks of the hosts, discovery of the VMs) runs from the start to the first "Starting a worker"
# in the controller's log (RUST_LOG=backflow_jobs=info). Every job's
# session record (--report) must say success; its placements (VM host > worker host, transport)
# are in the table, and the fallback's must be local on h2 and nbd_tls from another host. After
# each round one VM per case is restored (`backflow restore --to X.raw`, not timed) and compared
# with its disk (`qemu-img compare -f raw -F qcow2`): a difference fails the run.
# Prints a Markdown table of the medians over RUNS rounds, and writes the same to a results file.
#
#   bash benches/e2e-cluster.sh [MIB] [FALLBACK_MIB]   default 256 and 1024; RUNS=3,
#        BACKFLOW=target/release/backflow (copied into the work directory: the hosts' workers and
#        the controller run that copy), BENCH_DIR=/var/tmp/backflow-e2e-cluster (removed at the end,
#        the lab with it; KEEP=1 keeps both), RESULTS=target/bench-results/e2e-cluster-DATE.md (+
#        .logs/: every job's session record and output)
# Runs as root (the lab does). Needs Garage (scripts/setup.sh builds it) and about
# 2 x 8 x MIB + 2 x FALLBACK_MIB of disk for the VMs, plus the repositories: roughly
# RUNS x (3 x 8 x MIB + 2 x FALLBACK_MIB) x 0.6.
#
# All three "hosts" are namespaces on this one machine: they share its cores, its page cache and
# its disk. The 3-host case cannot gain CPU over the 1-host ones; what the ratios show is the cost
# of coordination (checks, ssh, one worker per VM on several hosts) and the effect of max_vms.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-256}
FALLBACK_MIB=${2:-1024}
RUNS=${RUNS:-3}
WORK=${BENCH_DIR:-/var/tmp/backflow-e2e-cluster}
RESULTS=${RESULTS:-target/bench-results/e2e-cluster-$(date -u +%Y%m%dT%H%M%SZ).md}
SOURCE_BF=${BACKFLOW:-target/release/backflow}
# The eight VMs' hosts in the 3-host case.
SPREAD=(h1 h1 h1 h2 h2 h2 h3 h3)
# How long one job may take before the run is declared hung.
JOB_TIMEOUT=900

say() { echo "e2e-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the lab makes namespaces and runs libvirtd)"
[[ "$MIB" =~ ^[0-9]+$ && "$MIB" -ge 4 && $((MIB % 4)) -eq 0 ]] || die "MIB: a multiple of 4, not $MIB"
[[ "$FALLBACK_MIB" =~ ^[0-9]+$ && "$FALLBACK_MIB" -ge 2 && $((FALLBACK_MIB % 2)) -eq 0 ]] \
  || die "FALLBACK_MIB: an even number, not $FALLBACK_MIB"
for tool in jq qemu-img seq /usr/bin/time; do
  command -v "$tool" >/dev/null || die "$tool is required (Debian: jq, qemu-utils, coreutils, time)"
done
[ -x "$SOURCE_BF" ] || die "no backflow at $SOURCE_BF (cargo build --release -p backflow, or BACKFLOW=)"

LAB_DIR=$WORK/lab
SAMPLER=
cleanup() {
  local status=$?
  if [ -n "$SAMPLER" ]; then kill "$SAMPLER" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then
    say "KEEP=1: the lab and the work directory stay ($WORK; bash scripts/cluster.sh down $LAB_DIR)"
  else
    if [ -f "$LAB_DIR/lab" ]; then bash scripts/cluster.sh down "$LAB_DIR" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
  fi
  exit "$status"
}
# A lab an earlier, killed run left behind goes first.
if [ -f "$LAB_DIR/lab" ]; then bash scripts/cluster.sh down "$LAB_DIR"; fi
rm -rf "$WORK"
mkdir -p "$WORK"
chmod 0755 "$WORK"
trap cleanup EXIT
mkdir -p "$(dirname "$RESULTS")" "$RESULTS.logs"
RESULTS=$(realpath "$RESULTS")
LOGS=$RESULTS.logs

# The binary, frozen for the run (a cargo build elsewhere cannot swap it): the controller and
# every host's workers run this copy. Whether it has test hooks (a build with test targets turns
# them on; they act only when their variables are set, which this script never does) goes in the
# results: a hooked backup creates the pause file and waits for it to go (the timeout ends it).
cp "$SOURCE_BF" "$WORK/backflow"
BF=$WORK/backflow
mkdir -p "$WORK/hooks"
head -c 1048576 /dev/urandom >"$WORK/hooks/disk.img"
"$BF" init --repo "$WORK/hooks/repo" >/dev/null
# (In a subshell that waits for it: the shell's report of the SIGKILL that ends a hooked run goes
# to the subshell's stderr, which is discarded.)
(BACKFLOW_PAUSE_BEFORE_COMMIT="$WORK/hooks/paused" timeout -k 2 10 "$BF" run specs/backup-image.yaml \
  --quiet --var source="$WORK/hooks/disk.img" --var repo="$WORK/hooks/repo" --var disk=disk || :) >/dev/null 2>&1
HOOKS="no test hooks"
[ ! -e "$WORK/hooks/paused" ] || HOOKS="test hooks compiled in (inactive: their variables are unset)"
rm -rf "$WORK/hooks"
COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- pipeline repository stages cli nbd qemu \
  planner libvirt notify jobs cluster specs 2>/dev/null || echo ' + uncommitted changes')"

# --- the disks ------------------------------------------------------------------------------------

# image FILE MIB ID RANDOM_QUARTERS TEXT_QUARTERS: a raw image of MIB MiB, RANDOM_QUARTERS/4 of it
# pseudo-random, then TEXT_QUARTERS/4 text lines naming ID, the rest zeros (a hole).
image() {
  local file=$1 mib=$2 id=$3 rq=$4 tq=$5
  head -c $((mib * rq / 4))M /dev/urandom >"$file"
  # seq ends on SIGPIPE when head has enough.
  { seq -f "backflow e2e-cluster disk $id, line %012.0f: the quick brown fox jumps over the lazy dog" \
    1 $((mib * tq / 4 * 1048576 / 80 + 1)) || true; } | head -c $((mib * tq / 4))M >>"$file"
  truncate -s "${mib}M" "$file"
}
say "writing 8 images of $MIB MiB and one of $FALLBACK_MIB MiB"
mkdir -p "$WORK/images"
for i in $(seq 8); do image "$WORK/images/vm$i.raw" "$MIB" "vm$i" 2 1; done
image "$WORK/images/fallback.raw" "$FALLBACK_MIB" fallback 2 2

# --- the lab ---------------------------------------------------------------------------------------

say "making the lab in $LAB_DIR"
BACKFLOW=$BF bash scripts/cluster.sh up "$LAB_DIR" >"$LOGS/lab-up.log" 2>&1 \
  || { cat "$LOGS/lab-up.log" >&2; die "the lab did not come up"; }
set -a
# shellcheck source=/dev/null
. "$LAB_DIR/env"
set +a
# add VM_HOST IMAGE: one more VM; prints its name.
add() { bash scripts/cluster.sh add-vm "$LAB_DIR" "$1" "$2" 2>>"$LOGS/lab-up.log"; }
SPREAD_VMS=() ONE_VMS=()
for i in $(seq 8); do
  SPREAD_VMS+=("$(add "${SPREAD[$((i - 1))]}" "$WORK/images/vm$i.raw")")
done
for i in $(seq 8); do ONE_VMS+=("$(add h1 "$WORK/images/vm$i.raw")"); done
FALLBACK_VM=$(add h2 "$WORK/images/fallback.raw")
disk_of() { awk -v n="$1" '$1 == n { print $3 }' "$LAB_DIR/vms"; }
KVM=$(grep -q "type='kvm'" "$LAB_DIR/shared/${FALLBACK_VM}.xml" && echo KVM || echo "TCG (no usable /dev/kvm)")
GARAGE_PID=$(cut -d' ' -f1 "$LAB_DIR/pids/garage.pid")

# Cluster files: the lab's (max_vms 2 on every host), one with h1's max_vms at 6, one with h2's
# worker disabled (a host's setting wins field by field over the defaults).
with_host_line() { # with_host_line HOST LINE OUT
  local needle="  - name: $1"
  grep -qx "$needle" "$LAB_DIR/cluster.yaml" || die "no host $1 in $LAB_DIR/cluster.yaml"
  awk -v n="$needle" -v l="    $2" '{ print } $0 == n { print l }' "$LAB_DIR/cluster.yaml" >"$3"
}
with_host_line h1 "worker: {max_vms: 6}" "$LAB_DIR/cluster-h1x6.yaml"
with_host_line h2 "worker: {enabled: false}" "$LAB_DIR/cluster-no-h2.yaml"

# The cases: name, cluster file, VMs, what the placement must be (own: each on its own host's
# worker; local-h2: h2's worker, local; tls: another worker, nbd_tls).
declare -A CLUSTER VMS EXPECT TITLE
CASES=(3h 1h 1h6 fb-local fb-tls)
CLUSTER[3h]=$LAB_DIR/cluster.yaml VMS[3h]="${SPREAD_VMS[*]}" EXPECT[3h]=own
CLUSTER[1h]=$LAB_DIR/cluster.yaml VMS[1h]="${ONE_VMS[*]}" EXPECT[1h]=own
CLUSTER[1h6]=$LAB_DIR/cluster-h1x6.yaml VMS[1h6]="${ONE_VMS[*]}" EXPECT[1h6]=own
CLUSTER[fb-local]=$LAB_DIR/cluster.yaml VMS[fb-local]=$FALLBACK_VM EXPECT[fb-local]=local-h2
CLUSTER[fb-tls]=$LAB_DIR/cluster-no-h2.yaml VMS[fb-tls]=$FALLBACK_VM EXPECT[fb-tls]=tls
TITLE[3h]="3 hosts (3/3/2), max_vms 2 each"
TITLE[1h]="1 host (8 on h1), max_vms 2"
TITLE[1h6]="1 host (8 on h1), max_vms 6"
TITLE[fb-local]="h2's own worker, unix socket (local read)"
TITLE[fb-tls]="another host's worker, NBD on TCP + TLS"

# --- measuring ----------------------------------------------------------------------------------

# sampler OUT: until killed, every 0.5 s, the highest VmHWM (KiB) of this run's workers (the copy
# of backflow with `worker` as its first argument; other labs' workers run other binaries) into OUT.
sampler() {
  local out=$1 max=0 pid hwm
  # Processes come and go between pgrep and the reads: nothing here may end the loop.
  set +e +o pipefail
  echo 0 >"$out"
  while :; do
    for pid in $(pgrep -x backflow); do
      [ "$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | head -2 | tr '\n' ' ')" = "$BF worker " ] \
        || continue
      hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
      if [ -n "$hwm" ] && [ "$hwm" -gt "$max" ]; then
        max=$hwm
        echo "$max" >"$out"
      fi
    done
    sleep 0.5
  done
}
garage_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$GARAGE_PID/stat"; }

# setup_s BEGAN LOG: seconds from BEGAN (date +%s.%N) to the controller's first "Starting a
# worker" in LOG: its checks of every host and the discovery of the VMs.
setup_s() {
  local first
  first=$(grep -m1 'Starting a worker' "$2" | cut -d' ' -f1)
  [ -n "$first" ] || { echo nan; return; }
  awk -v a="$1" -v b="$(date -d "$first" +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}

# run_case CASE ROUND: a fresh repository, the job, its record checked; appends to $WORK/times
# "CASE_ROUND wall_s controller_rss_kib worker_rss_kib garage_cpu_s vm_s_mean vm_s_max bytes_read
# placements setup_s" (placements: "VMHOST>WORKERHOST/TRANSPORT:COUNT,...").
run_case() {
  local c=$1 r=$2 repo=s3://backflow/bench-$1-$2 job=$WORK/job-$1-$2.yaml report=$LOGS/$1-$2.json
  local before after rss place vm
  "$BF" init --repo "$repo" >/dev/null
  {
    echo "name: bench-$c-$r"
    echo "cluster: ${CLUSTER[$c]}"
    echo "repository: $repo"
    echo "vms: [$(echo "${VMS[$c]}" | sed 's/ /, /g')]"
  } >"$job"
  sampler "$WORK/worker-rss" &
  SAMPLER=$!
  before=$(garage_cpu)
  began=$(date +%s.%N)
  # RUST_LOG: the controller logs each worker's start with a timestamp (the setup column).
  if ! RUST_LOG=backflow_jobs=info /usr/bin/time -f "%e %M" -o "$WORK/t" timeout -k 10 "$JOB_TIMEOUT" \
    "$BF" job run --quiet --report "$report" "$job" >"$LOGS/$c-$r.log" 2>&1; then
    kill "$SAMPLER" 2>/dev/null || true; SAMPLER=
    cat "$LOGS/$c-$r.log" >&2
    [ -f "$report" ] && jq -c '.vms[] | {vm, result, error, placement, attempts}' "$report" >&2
    die "job $c (round $r) failed"
  fi
  after=$(garage_cpu)
  kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=
  rss=$(cat "$WORK/worker-rss")
  jq -e --arg n "$(echo "${VMS[$c]}" | wc -w)" \
    '.result == "success" and (.vms | length) == ($n | tonumber) and all(.vms[]; .result == "success")' \
    "$report" >/dev/null || { jq -c '.vms[] | {vm, result, error, warnings}' "$report" >&2; die "job $c (round $r): not every VM succeeded"; }
  place=$(jq -r '[.vms[].placement | "\(.vm_host)>\(.worker_host)/\(.transport)"] | group_by(.)
    | map("\(.[0]):\(length)") | join(",")' "$report")
  case ${EXPECT[$c]} in
    own) jq -e 'all(.vms[].placement; .vm_host == .worker_host and .transport == "local")' "$report" >/dev/null \
      || say "job $c (round $r): not every VM on its own host's worker ($place): the table says so" ;;
    local-h2) [ "$place" = "h2>h2/local:1" ] || die "job $c (round $r): placed $place, not on h2's own worker" ;;
    tls) [[ "$place" =~ ^h2\>h[13]/nbd_tls:1$ ]] || die "job $c (round $r): placed $place, not over NBD+TLS from another host" ;;
  esac
  echo "${c}_$r $(cat "$WORK/t") $rss $(awk -v a="$before" -v b="$after" 'BEGIN { printf "%.2f", b - a }') \
$(jq -r '[.vms[].seconds] | "\(add / length) \(max)"' "$report") $(jq '[.vms[].bytes_read] | add' "$report") $place \
$(setup_s "$began" "$LOGS/$c-$r.log")" \
    >>"$WORK/times"
  say "  $(tail -1 "$WORK/times")"
}

# check_restore CASE ROUND VM: VM's snapshot of that job restored to a raw file, compared with its
# disk; a difference ends the run.
check_restore() {
  local c=$1 r=$2 vm=$3 snap out=$WORK/restored.raw
  snap=$(jq -r --arg vm "$vm" '.vms[] | select(.vm == $vm) | .snapshot' "$LOGS/$c-$r.json")
  [ -n "$snap" ] && [ "$snap" != null ] || die "job $c (round $r) recorded no snapshot of $vm"
  rm -f "$out"
  "$BF" restore --quiet --no-sync --repo "s3://backflow/bench-$c-$r" --snapshot "$snap" --to "$out" \
    >"$LOGS/restore-$c-$r.log" 2>&1 || { cat "$LOGS/restore-$c-$r.log" >&2; die "restore of $vm ($c, round $r) failed"; }
  qemu-img compare -U -f raw -F qcow2 "$out" "$(disk_of "$vm")" >"$LOGS/compare-$c-$r.log" 2>&1 \
    || { cat "$LOGS/compare-$c-$r.log" >&2; die "$vm ($c, round $r): the restore differs from its disk"; }
  rm -f "$out"
  echo "$c $r $vm" >>"$WORK/restored"
}

LOADS=()
: >"$WORK/restored"
for r in $(seq 1 "$RUNS"); do
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  say "round $r of $RUNS (load average ${LOADS[-1]})"
  for c in "${CASES[@]}"; do run_case "$c" "$r"; done
  # One VM per case, a different one each round.
  i=$(((r - 1) % 8))
  check_restore 3h "$r" "${SPREAD_VMS[$i]}"
  check_restore 1h "$r" "${ONE_VMS[$i]}"
  check_restore 1h6 "$r" "${ONE_VMS[$(((i + 4) % 8))]}"
  check_restore fb-local "$r" "$FALLBACK_VM"
  check_restore fb-tls "$r" "$FALLBACK_VM"
done
LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
say "every restore checked is identical to its VM's disk (qemu-img compare): $(wc -l <"$WORK/restored") of them"

# --- the report -----------------------------------------------------------------------------------

# med CASE FIELD: the median over the rounds of FIELD of $WORK/times (2: wall s, 3: controller RSS
# KiB, 4: workers' RSS KiB, 5: Garage CPU s, 6: mean VM s, 7: longest VM s, 8: bytes read, 10:
# setup s).
med() {
  local c=$1 f=$2 r
  for r in $(seq 1 "$RUNS"); do awk -v k="${c}_$r" -v f="$f" '$1 == k { print $f }' "$WORK/times"; done \
    | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
all() { # all CASE: every round's wall time, "a / b / c"
  local c=$1 r out=""
  for r in $(seq 1 "$RUNS"); do out+="${out:+ / }$(awk -v k="${c}_$r" '$1 == k { print $2 }' "$WORK/times")"; done
  echo "$out"
}
maxf() { awk -v p="^$1_" -v f="$2" '$1 ~ p && $f > m { m = $f } END { printf "%.0f", m / 1024 }' "$WORK/times"; }
places() { # places CASE: the placements, once when every round agrees
  awk -v p="^$1_" '$1 ~ p { print $9 }' "$WORK/times" | sort -u | sed 's/,/, /g; s/:/ x/g' | paste -sd ';' | sed 's/;/; /g'
}
fmt() { awk -v v="$1" -v d="${2:-2}" 'BEGIN { printf "%.*f", d, v }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

report() {
  local c wall read
  echo "Disks: 8 VMs of $MIB MiB (half pseudo-random, a quarter text, a quarter zeros; distinct), one of $FALLBACK_MIB MiB (half random, half text); qcow2 on the lab's shared directory; VMs under $KVM, no OS."
  echo "Lab: scripts/cluster.sh (3 hosts as namespaces of this machine, Garage $("$GARAGE" --version 2>/dev/null | head -1 | cut -d' ' -f2 | sed 's/^cargo://') as the repository); the hosts share the machine's $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), its page cache and its disk."
  echo "Load average (1/5/15 min) at each round's start and at the end: $(printf '%s; ' "${LOADS[@]}")"
  echo "Commit (when the run began): $COMMIT; backflow $("$BF" --version | cut -d' ' -f2), $HOOKS; date $(date -u +%Y-%m-%dT%H:%MZ); $RUNS rounds, cases interleaved; medians."
  echo
  echo "| job | VMs | job wall s, median (rounds) | MiB/s read | setup s | VM backup s, mean / longest | controller peak RSS MiB | worker peak RSS MiB | Garage CPU s | placement (VM host>worker host/transport x VMs) |"
  echo "|---|---:|---|---:|---:|---|---:|---:|---:|---|"
  for c in "${CASES[@]}"; do
    wall=$(med "$c" 2)
    read=$(med "$c" 8)
    echo "| ${TITLE[$c]} | $(echo "${VMS[$c]}" | wc -w) | $(fmt "$wall") ($(all "$c")) | $(rate "$read" "$wall") | $(med "$c" 10) | $(fmt "$(med "$c" 6)") / $(fmt "$(med "$c" 7)") | $(maxf "$c" 3) | $(maxf "$c" 4) | $(med "$c" 5) | $(places "$c") |"
  done
  echo
  echo "Read by each eight-VM job: $(mib "$(med 3h 8)") MiB (the disks' allocated data); by the fallback's: $(mib "$(med fb-local 8)") MiB. MiB/s: bytes read / job wall time. Setup: from the start of \`job run\` to its first worker's start (checks of the 3 hosts, discovery of the VMs). VM backup s: each VM's own record (its worker's run)."
  echo
  echo "| ratio (medians) | job wall time | |"
  echo "|---|---:|---|"
  echo "| 1 host, max_vms 2 / 3 hosts | $(ratio "$(med 1h 2)" "$(med 3h 2)") | the same 8 VMs, 2 at once against 6 at once |"
  echo "| 1 host, max_vms 6 / 3 hosts | $(ratio "$(med 1h6 2)" "$(med 3h 2)") | 6 at once on either: the number of hosts alone |"
  echo "| fallback: NBD+TLS / local | $(ratio "$(med fb-tls 2)" "$(med fb-local 2)") | job wall; the VM's own backup: $(ratio "$(med fb-tls 6)" "$(med fb-local 6)") ($(fmt "$(med fb-tls 6)") s against $(fmt "$(med fb-local 6)") s, $(rate "$(med fb-tls 8)" "$(med fb-tls 6)") against $(rate "$(med fb-local 8)" "$(med fb-local 6)") MiB/s) |"
}
GARAGE=${GARAGE:-${BACKFLOW_TOOLS:-/opt/backflow-tools}/bin/garage}
report | tee "$RESULTS"
say "results: $RESULTS (session records and job output in $RESULTS.logs/)"
