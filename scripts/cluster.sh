#!/usr/bin/env bash
# A cluster of three KVM hosts on this one machine, for trying and testing clusters and workers
# (issue 14). docs/cluster-lab.md describes it; in short:
#
#   bash scripts/cluster.sh up DIR            makes the lab in DIR (a new or empty directory)
#   bash scripts/cluster.sh down DIR          removes all of it (idempotent; also after a failed up)
#   bash scripts/cluster.sh status DIR        says what runs
#   bash scripts/cluster.sh exec DIR HOST CMD...   runs CMD on HOST, as the host sees it
#   bash scripts/cluster.sh cut DIR HOST      unplugs HOST's cable (restore: plugs it in again)
#   bash scripts/cluster.sh stop-host DIR HOST     stops HOST's libvirtd and sshd (start-host)
#   bash scripts/cluster.sh migrate DIR VM HOST    live-migrates VM to HOST
#   bash scripts/cluster.sh add-vm DIR HOST SIZE|IMAGE   one more VM on HOST; prints its name
#
# Each host is a network namespace (bf-LAB-h1..h3) on a private bridge, with its own virtlogd,
# libvirtd and sshd in a mount namespace of its own, where libvirt's directories are private
# directories under DIR/hosts/HOST; Garage runs in a namespace of its own at .20. Four VMs without
# an OS run on the hosts (h1: 2, h2: 1, h3: 1), their disks in DIR/shared. up writes
# DIR/cluster.yaml, DIR/job.yaml and DIR/env (the AWS variables of the lab's store).
#
# Environment: LAB (the lab's id, at most 9 of a-z 0-9; default random), BACKFLOW (the backflow
# binary the hosts run; default this checkout's target/release/backflow), BACKFLOW_TOOLS (where
# setup.sh installed Garage; default /opt/backflow-tools) or GARAGE (its binary). Runs as root.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOSTS=(h1 h2 h3)
# Which host each VM is defined and started on (index: VM number - 1).
VM_HOSTS=(h1 h1 h2 h3)
# A VM's disk: small enough that a full backup of all four takes seconds.
VM_DISK_SIZE=64M
VM_MEMORY_MIB=64
# The last octets: the root namespace's side (where the controller runs), the hosts, the store.
ROOT_OCTET=1
HOST_OCTET_BASE=10  # h1 is .11
STORE_OCTET=20
# The lock and the range that testkit's Garage cluster (testkit/src/s3/netns.rs) choose /24s with,
# so that labs and those clusters never take the same subnet.
SUBNET_LOCK=/tmp/backflow-testkit-subnet.lock
SECOND_OCTET_MIN=201
SECOND_OCTET_MAX=250
# libvirt's directories that each host has its own of: name under DIR/hosts/HOST, mount point.
PRIVATE_DIRS=(run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt
  etc:/etc/libvirt)
# Garage: its customary ports, the region the lab's clients sign with, the bucket and the prefix
# of the job's repository.
S3_PORT=3900
RPC_PORT=3901
ADMIN_PORT=3903
REGION=garage
BUCKET=backflow
PREFIX=lab
# How long a daemon may take to answer: a libvirtd whose capability cache is cold probes QEMU.
READY_TENTHS=600
# How long one virsh command may take: a hung libvirtd must not hang `down`.
VIRSH_TIMEOUT=60
# How long a daemon may take to exit after SIGTERM before it gets SIGKILL.
STOP_TENTHS=100

say() { echo "cluster: $*" >&2; }
die() { say "$*"; exit 1; }

usage() {
  sed -n '5,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# --- the lab's state: DIR/lab holds its names, sourced by every command ---------------------

load() { # load DIR: sets DIR (absolute) and the lab's names from DIR/lab
  DIR=$(cd "$1" && pwd)
  [ -f "$DIR/lab" ] || die "$DIR is not a lab's directory (no $DIR/lab)"
  # shellcheck source=/dev/null
  . "$DIR/lab"
  names
}

names() { # from LAB and SUBNET
  HUB=bf-$LAB-hub
  STORE_NS=bf-$LAB-s3
  ROOT_IF=bf-$LAB-up
  KEY=$DIR/ssh/id_ed25519
}

host_ns() { echo "bf-$LAB-$1"; }
host_index() { # h2 -> 2
  local h=$1
  case "$h" in h[1-9]) echo "${h#h}" ;; *) die "no host $h (hosts: ${HOSTS[*]})" ;; esac
  [ "${h#h}" -le "${#HOSTS[@]}" ] || die "no host $h (hosts: ${HOSTS[*]})"
}
host_addr() { echo "$SUBNET.$((HOST_OCTET_BASE + $(host_index "$1")))"; }
host_uri() {
  echo "qemu+ssh://root@$(host_addr "$1")/system?keyfile=$KEY&no_verify=1&no_tty=1"
}
vm_name() { echo "bf-$LAB-vm$1"; }

# in_host HOST CMD...: CMD in HOST's network, mount and UTS namespaces (what sshd and libvirtd
# there see). Not `ip netns exec`: that makes a new mount namespace for every command, where
# /run/libvirt would be the machine's.
in_host() {
  local h=$1
  shift
  nsenter --net="/run/netns/$(host_ns "$h")" --mount="$DIR/ns/$h.mnt" --uts="$DIR/ns/$h.uts" \
    -- "$@"
}

virsh_on() { # virsh_on HOST ARGS...: virsh on HOST's own libvirtd
  local h=$1
  shift
  in_host "$h" timeout "$VIRSH_TIMEOUT" virsh -q -c qemu:///system "$@"
}

# --- processes, recorded by pid in DIR/pids/NAME.pid with the command name beside it ---------

# spawn NAME COMM LOG CMD...: starts CMD in the background in a session of its own (so that
# neither the terminal's signals nor the caller's process group reach it), stdin from /dev/null
# and output to LOG; records its pid. CMD must exec its program (nsenter does), so that the pid
# recorded is the program's; COMM is that program's name, checked before anything is killed.
spawn() {
  local name=$1 comm=$2 log=$3
  shift 3
  setsid "$@" </dev/null >>"$log" 2>&1 8>&- &
  echo "$! $comm" >"$DIR/pids/$name.pid"
}

# spawn_in HOST NAME COMM LOG CMD...: spawn CMD in HOST's namespaces.
spawn_in() {
  local h=$1
  shift
  spawn "$1" "$2" "$3" nsenter --net="/run/netns/$(host_ns "$h")" --mount="$DIR/ns/$h.mnt" \
    --uts="$DIR/ns/$h.uts" -- "${@:4}"
}

# pid_of NAME: the recorded pid when that process still runs (and is still what was started).
pid_of() {
  local file=$DIR/pids/$1.pid pid comm
  [ -f "$file" ] || return 1
  read -r pid comm <"$file"
  alive "$pid" "$comm" && echo "$pid"
}

alive() { # alive PID COMM
  [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] \
    && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

# stop NAME: SIGTERM, then SIGKILL after STOP_TENTHS; forgets the pid.
stop() {
  local name=$1 pid comm
  [ -f "$DIR/pids/$name.pid" ] || return 0
  read -r pid comm <"$DIR/pids/$name.pid"
  if alive "$pid" "$comm"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq "$STOP_TENTHS"); do
      alive "$pid" "$comm" || break
      sleep 0.1
    done
    if alive "$pid" "$comm"; then
      say "$name (pid $pid) did not exit after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$DIR/pids/$name.pid"
}

# wait_for WHAT LOG CMD...: polls CMD until it succeeds; fails with the end of LOG.
wait_for() {
  local what=$1 log=$2
  shift 2
  for _ in $(seq "$READY_TENTHS"); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  say "$what: no answer after $((READY_TENTHS / 10)) s; the end of $log:"
  tail -n 20 "$log" >&2 2>/dev/null || true
  return 1
}

# --- up -----------------------------------------------------------------------------------------

check_tools() {
  [ "$(id -u)" -eq 0 ] || die "run as root (network namespaces, mounts, libvirtd)"
  local missing=() tool
  for tool in ip nsenter unshare setsid flock runuser findmnt mountpoint virsh libvirtd virtlogd qemu-img \
    qemu-io ssh ssh-keygen certtool timeout; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ -x /usr/sbin/sshd ] || missing+=(sshd)
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (bash scripts/setup.sh installs them)"
}

check_garage() {
  local tools=${BACKFLOW_TOOLS:-/opt/backflow-tools}
  GARAGE=${GARAGE:-$tools/bin/garage}
  [ -x "$GARAGE" ] || die "no Garage at $GARAGE: bash scripts/setup.sh builds it in the \
background (log: $tools/build/garage.log)"
}

# Chooses a 10.A.B/24 that no address or route of the root namespace uses and claims it by
# giving the root namespace's side its .1, under the lock testkit's clusters take too.
claim_subnet() {
  local taken span start n i a b
  exec 9>"$SUBNET_LOCK"
  flock 9
  taken=$(ip -4 -o addr show; ip -4 route show table all)
  span=$(((SECOND_OCTET_MAX - SECOND_OCTET_MIN + 1) * 256))
  start=$(($(od -An -N4 -tu4 /dev/urandom) % span))
  SUBNET=
  for ((i = 0; i < span; i++)); do
    n=$(((start + i) % span))
    a=$((SECOND_OCTET_MIN + n / 256))
    b=$((n % 256))
    if ! grep -qE "(^|[[:space:]])10\.$a\.$b\." <<<"$taken"; then
      SUBNET=10.$a.$b
      break
    fi
  done
  [ -n "$SUBNET" ] || die "no free /24 in 10.$SECOND_OCTET_MIN.0.0-10.$SECOND_OCTET_MAX.255.0"
  ip link add "$ROOT_IF" type veth peer name up0 netns "$HUB"
  ip addr add "$SUBNET.$ROOT_OCTET/24" dev "$ROOT_IF"
  ip link set "$ROOT_IF" up
  echo "SUBNET=$SUBNET" >>"$DIR/lab"
  exec 9>&-
}

# The network: the bridge lives in a namespace of its own (the hub), not in the root namespace:
# bridged traffic would otherwise pass the root namespace's iptables FORWARD chain when
# br_netfilter is loaded (Docker loads it and drops forwarded packets), and the hub has no rules.
# No namespace has a default route and the root namespace does not forward (the lab does not
# change ip_forward), so nothing the hosts send leaves the bridge.
make_network() {
  local h ns
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  for ns in "${HOSTS[@]}" s3; do
    ip netns add "bf-$LAB-$ns"
    ip -n "bf-$LAB-$ns" link set lo up
    ip -n "$HUB" link add "$ns" type veth peer name eth0 netns "bf-$LAB-$ns"
    ip -n "$HUB" link set "$ns" master br0 up
  done
  claim_subnet
  ip -n "$HUB" link set up0 master br0 up
  for h in "${HOSTS[@]}"; do
    ip -n "$(host_ns "$h")" addr add "$(host_addr "$h")/24" dev eth0
    ip -n "$(host_ns "$h")" link set eth0 up
  done
  ip -n "$STORE_NS" addr add "$SUBNET.$STORE_OCTET/24" dev eth0
  ip -n "$STORE_NS" link set eth0 up
}

# One CA, a server certificate per host (its address as IP SAN) in the layout QEMU's
# tls-creds-x509 wants (HOST/ca-cert.pem, server-cert.pem, server-key.pem), and one client
# certificate for the workers (DIR/pki/ca-cert.pem, client-cert.pem, client-key.pem: the same
# layout on the client side). ECDSA P-256 keys: made at once, and every TLS stack takes them.
make_pki() {
  local pki=$DIR/pki h
  mkdir -p "$pki/templates"
  key() { certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --no-text \
    --outfile "$1" 2>/dev/null; }
  cat >"$pki/templates/ca.info" <<EOF
organization = "backflow lab $LAB"
cn = "backflow lab $LAB CA"
ca
cert_signing_key
crl_signing_key
expiration_days = 365
EOF
  key "$pki/ca-key.pem"
  certtool --generate-self-signed --load-privkey "$pki/ca-key.pem" \
    --template "$pki/templates/ca.info" --outfile "$pki/ca-cert.pem" --no-text 2>/dev/null
  for h in "${HOSTS[@]}"; do
    mkdir -p "$pki/$h"
    cat >"$pki/templates/$h.info" <<EOF
organization = "backflow lab $LAB"
cn = "$h"
ip_address = "$(host_addr "$h")"
dns_name = "$h"
tls_www_server
signing_key
encryption_key
expiration_days = 365
EOF
    key "$pki/$h/server-key.pem"
    certtool --generate-certificate --load-privkey "$pki/$h/server-key.pem" \
      --load-ca-certificate "$pki/ca-cert.pem" --load-ca-privkey "$pki/ca-key.pem" \
      --template "$pki/templates/$h.info" --outfile "$pki/$h/server-cert.pem" --no-text 2>/dev/null
    cp "$pki/ca-cert.pem" "$pki/$h/ca-cert.pem"
    # QEMU (user libvirt-qemu) reads the host's files itself when a backup job starts its
    # NBD server with TLS.
    chgrp -R libvirt-qemu "$pki/$h"
    chmod 0750 "$pki/$h"
    chmod 0640 "$pki/$h"/*
  done
  cat >"$pki/templates/client.info" <<EOF
organization = "backflow lab $LAB"
cn = "backflow worker"
tls_www_client
signing_key
encryption_key
expiration_days = 365
EOF
  key "$pki/client-key.pem"
  certtool --generate-certificate --load-privkey "$pki/client-key.pem" \
    --load-ca-certificate "$pki/ca-cert.pem" --load-ca-privkey "$pki/ca-key.pem" \
    --template "$pki/templates/client.info" --outfile "$pki/client-cert.pem" --no-text 2>/dev/null
  chmod 0600 "$pki"/*-key.pem
  runuser -u libvirt-qemu -- test -r "$pki/h1/server-key.pem" \
    || die "user libvirt-qemu cannot read $pki/h1/server-key.pem: every directory above \
$DIR must let others through (chmod o+x), or choose a DIR under /tmp"
}

# One ed25519 key pair for the controller, authorised on every host; a host key per host, and
# DIR/ssh/known_hosts with them for clients that check (ssh -o UserKnownHostsFile=...).
make_ssh() {
  local h
  mkdir -p "$DIR/ssh"
  ssh-keygen -q -t ed25519 -N '' -C "backflow-lab-$LAB" -f "$KEY"
  cp "$KEY.pub" "$DIR/ssh/authorized_keys"
  : >"$DIR/ssh/known_hosts"
  for h in "${HOSTS[@]}"; do
    ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$DIR/hosts/$h/ssh_host_ed25519_key"
    echo "$(host_addr "$h") $(cut -d' ' -f1,2 "$DIR/hosts/$h/ssh_host_ed25519_key.pub")" \
      >>"$DIR/ssh/known_hosts"
  done
}

# A host's directories and configuration, and its mount and UTS namespaces: persistent
# (bind-mounted on DIR/ns/HOST.mnt and .uts) so that every daemon of the host, the sessions of its
# sshd and `in_host` share them.
make_host() {
  local h=$1 hd=$DIR/hosts/$1 pair mounts=
  for pair in "${PRIVATE_DIRS[@]}"; do
    mkdir -p "$hd/${pair%%:*}"
    # As the originals: QEMU (libvirt-qemu) walks into its directories under them.
    chmod 0755 "$hd/${pair%%:*}"
    mounts+="mkdir -p ${pair#*:} && mount --bind '$hd/${pair%%:*}' ${pair#*:} && "
  done
  # The host's temporary directory (its sessions' TMPDIR, below): where its workers make their job
  # directories. Hosts of a real cluster do not share /tmp, and a worker takes a job directory it
  # sees with a live owner for another run of its host.
  mkdir -p "$hd/tmp"
  chmod 1777 "$hd/tmp"
  cat >"$hd/etc/libvirtd.conf" <<EOF
# libvirtd of lab $LAB, host $h: listens on its unix sockets only (no --listen).
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$hd/etc/qemu.conf" <<EOF
# The NBD servers of pull-mode backups with TLS: this host's certificate, and clients must show
# one signed by the lab's CA.
backup_tls_x509_cert_dir = "$DIR/pki/$h"
backup_tls_x509_verify = 1
EOF
  # Copies of the machine's cache of QEMU's capabilities, so that the first start does not probe
  # QEMU (libvirt checks them against the binaries and probes when they do not match).
  if [ -d /var/cache/libvirt/qemu/capabilities ]; then
    mkdir -p "$hd/cache/qemu/capabilities"
    cp /var/cache/libvirt/qemu/capabilities/*.xml "$hd/cache/qemu/capabilities/" 2>/dev/null || true
  fi
  cat >"$hd/sshd_config" <<EOF
# sshd of lab $LAB, host $h.
ListenAddress $(host_addr "$h"):22
HostKey $hd/ssh_host_ed25519_key
PidFile $hd/sshd.pid
AuthorizedKeysFile $DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
# The controller opens a connection per libvirt URI and per worker, many at once.
MaxStartups 200
MaxSessions 200
# A controller that vanished (its host down, the network cut) ends its sessions here within 15 s:
# each worker then sees its stdin close and stops its run, which ends the VM's backup job.
ClientAliveInterval 5
ClientAliveCountMax 3
SetEnv TMPDIR=$hd/tmp
Subsystem sftp internal-sftp
EOF
  touch "$DIR/ns/$h.mnt" "$DIR/ns/$h.uts"
  # Made inside the host's network namespace, so that its sysfs shows the host's interfaces
  # (libvirtd enumerates them) rather than the machine's. The new mount namespace starts as a
  # copy of the root namespace's mounts, with the files of every network and UTS namespace that
  # exists now (other labs', other tests'): unmounted here, so that this host does not keep them
  # alive after their owners removed them. The fresh sysfs has no cgroup hierarchies under it,
  # so the host's libvirtd runs its QEMUs without cgroups and leaves none in the machine's.
  # /etc/hosts names the lab's hosts (libvirt resolves its own host name, and a migration's
  # destination by its name).
  nsenter --net="/run/netns/$(host_ns "$h")" -- \
    unshare --mount="$DIR/ns/$h.mnt" --uts="$DIR/ns/$h.uts" --propagation private -- sh -c "
    set -e
    findmnt -rn -t nsfs -o TARGET | while read -r m; do umount -l \"\$m\" || true; done
    umount -l /sys && mount -t sysfs sysfs /sys
    mount --bind '$DIR/etc-hosts' /etc/hosts
    ${mounts}hostname $h"
}

start_libvirt() { # start_libvirt HOST: virtlogd, then libvirtd (pid files of their own: the
  # defaults, /run/virtlogd.pid and /run/libvirtd.pid, are the machine's daemons')
  local h=$1 hd=$DIR/hosts/$1
  if ! pid_of "$h-virtlogd" >/dev/null; then
    spawn_in "$h" "$h-virtlogd" virtlogd "$hd/virtlogd.stderr" virtlogd -p "$hd/virtlogd.pid"
  fi
  spawn_in "$h" "$h-libvirtd" libvirtd "$hd/libvirtd.stderr" libvirtd -p "$hd/libvirtd.pid"
}

start_sshd() {
  local h=$1 hd=$DIR/hosts/$1
  mkdir -p /run/sshd # sshd's privilege separation directory (the package's, when installed)
  in_host "$h" /usr/sbin/sshd -t -f "$hd/sshd_config"
  spawn_in "$h" "$h-sshd" sshd "$hd/sshd.stderr" /usr/sbin/sshd -D -f "$hd/sshd_config" \
    -E "$hd/sshd.log"
}

libvirt_answers() { virsh_on "$1" version; }
sshd_answers() { in_host "$1" bash -c "exec 3<>/dev/tcp/$(host_addr "$1")/22"; }

wait_host() {
  local h=$1 hd=$DIR/hosts/$1
  wait_for "$h's libvirtd" "$hd/log/libvirtd.log" libvirt_answers "$h" \
    || { tail -n 5 "$hd/libvirtd.stderr" >&2; return 1; }
  wait_for "$h's sshd" "$hd/sshd.log" sshd_answers "$h"
}

# Garage: one node (replication factor 1) in its own namespace, set up as an operator would (as
# testkit/src/s3/garage.rs does): garage.toml, `garage server`, the layout, a key, a bucket.
start_garage() {
  local g=$DIR/garage id
  mkdir -p "$g/meta" "$g/data"
  cat >"$g/garage.toml" <<EOF
metadata_dir = "$g/meta"
data_dir = "$g/data"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "0.0.0.0:$RPC_PORT"
rpc_public_addr = "$SUBNET.$STORE_OCTET:$RPC_PORT"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "0.0.0.0:$S3_PORT"

[admin]
api_bind_addr = "0.0.0.0:$ADMIN_PORT"
admin_token = "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
EOF
  spawn garage garage "$g/log" env RUST_LOG=garage=info,garage_api_common=warn \
    nsenter --net="/run/netns/$STORE_NS" -- "$GARAGE" -c "$g/garage.toml" server
}

garage_cli() {
  nsenter --net="/run/netns/$STORE_NS" -- env RUST_LOG=warn "$GARAGE" -c "$DIR/garage/garage.toml" "$@"
}

health() { # health [ok]: Garage's admin API answers (with 200 OK when ok is asked for)
  local status
  # shellcheck disable=SC2016 # the inner shell expands them
  status=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "GET /health HTTP/1.0\r\n\r\n" >&3 \
    && head -n 1 <&3' sh "$SUBNET.$STORE_OCTET" "$ADMIN_PORT") || return 1
  case "${1:-any}" in
    ok) [[ "$status" == "HTTP/1."?" 200"* ]] ;;
    *) [[ "$status" == HTTP/* ]] ;;
  esac
}

set_up_garage() {
  local g=$DIR/garage id key_id secret
  wait_for "Garage" "$g/log" health any
  id=$(garage_cli node id -q)
  garage_cli layout assign -z dc1 -c 100G "${id%%@*}" >/dev/null
  garage_cli layout apply --version 1 >/dev/null
  wait_for "Garage's layout" "$g/log" health ok
  key_id=GK$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  garage_cli key import --yes "$key_id" "$secret" -n "lab-$LAB" >/dev/null
  garage_cli bucket create "$BUCKET" >/dev/null
  garage_cli bucket allow --read --write --owner "$BUCKET" --key "$key_id" >/dev/null
  # KEY=VALUE lines: `set -a; . DIR/env; set +a`, systemd's EnvironmentFile=, docker --env-file.
  cat >"$DIR/env" <<EOF
AWS_ENDPOINT_URL=http://$SUBNET.$STORE_OCTET:$S3_PORT
AWS_REGION=$REGION
AWS_DEFAULT_REGION=$REGION
AWS_ACCESS_KEY_ID=$key_id
AWS_SECRET_ACCESS_KEY=$secret
AWS_ALLOW_HTTP=true
EOF
  chmod 0600 "$DIR/env"
}

# Four VMs without an OS (SeaBIOS idles at "No bootable device"), each with one qcow2 disk in
# DIR/shared holding known data: VM n has bytes 0xn1 at [0, 1M), 0xn2 at [8M, 8M+256K) and 0xn3
# at [40M, 42M), zeros elsewhere. KVM when /dev/kvm works, else TCG; no <cpu> element (host-model
# and host-passthrough abort QEMU on these machines).
make_vms() {
  local n name h disk xml
  mkdir -p "$DIR/shared"
  chmod 0755 "$DIR/shared"
  : >"$DIR/vms"
  for n in $(seq "${#VM_HOSTS[@]}"); do
    name=$(vm_name "$n")
    h=${VM_HOSTS[$((n - 1))]}
    disk=$DIR/shared/$name.qcow2
    qemu-img create -q -f qcow2 "$disk" "$VM_DISK_SIZE"
    qemu-io -f qcow2 -c "write -P 0x${n}1 0 1M" -c "write -P 0x${n}2 8M 256K" \
      -c "write -P 0x${n}3 40M 2M" "$disk" >/dev/null
    echo "$name $h $disk" >>"$DIR/vms"
  done
  runuser -u libvirt-qemu -- test -x "$DIR/shared" \
    || die "user libvirt-qemu cannot reach $DIR/shared: every directory above $DIR must let \
others through (chmod o+x), or choose a DIR under /tmp"
  while read -r name h disk; do
    define_and_start "$name" "$h" "$disk"
  done <"$DIR/vms"
}

define_and_start() { # define_and_start NAME HOST DISK: KVM when it works, else TCG
  if ! { [ -c /dev/kvm ] && start_vm "$1" "$2" "$3" kvm; }; then
    virsh_on "$2" undefine "$1" >/dev/null 2>&1 || true
    start_vm "$1" "$2" "$3" qemu
  fi
}

# add_vm HOST SOURCE: one more VM on HOST, named after the next number; its disk is a new empty
# qcow2 image of SOURCE bytes (qemu-img's syntax: 64M, 1G) or a qcow2 copy of the image SOURCE.
add_vm() {
  local h=$1 source=$2 n name disk
  n=$(($(wc -l <"$DIR/vms") + 1))
  name=$(vm_name "$n")
  disk=$DIR/shared/$name.qcow2
  if [ -f "$source" ]; then
    qemu-img convert -q -O qcow2 "$source" "$disk"
  else
    qemu-img create -q -f qcow2 "$disk" "$source"
  fi
  define_and_start "$name" "$h" "$disk"
  echo "$name $h $disk" >>"$DIR/vms"
  echo "$name"
}

start_vm() { # start_vm NAME HOST DISK TYPE
  local name=$1 h=$2 disk=$3 type=$4 xml=$DIR/shared/$1.xml
  cat >"$xml" <<EOF
<domain type='$type'>
  <name>$name</name>
  <memory unit='MiB'>$VM_MEMORY_MIB</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  virsh_on "$h" define "$xml" >/dev/null && virsh_on "$h" start "$name" >/dev/null
}

write_files() {
  local h backflow=${BACKFLOW:-$ROOT/target/release/backflow}
  {
    echo "name: lab-$LAB"
    echo "tls:"
    echo "  ca: $DIR/pki/ca-cert.pem"
    echo "  cert: $DIR/pki/client-cert.pem"
    echo "  key: $DIR/pki/client-key.pem"
    echo "defaults:"
    echo "  ssh: {user: root, port: 22, key: $KEY}"
    echo "  backflow: $backflow"
    echo "  worker: {enabled: true, max_vms: 2}"
    echo "hosts:"
    for h in "${HOSTS[@]}"; do
      echo "  - name: $h"
      echo "    address: $(host_addr "$h")"
      echo "    uri: $(host_uri "$h")"
    done
  } >"$DIR/cluster.yaml"
  cat >"$DIR/job.yaml" <<EOF
name: lab-$LAB
cluster: $DIR/cluster.yaml
repository: s3://$BUCKET/$PREFIX
vms: ["*"]
EOF
  if [ -x "$backflow" ]; then
    # shellcheck source=/dev/null
    (set -a && . "$DIR/env" && "$backflow" init --repo "s3://$BUCKET/$PREFIX" >/dev/null)
    echo "REPOSITORY_INITIALISED=1" >>"$DIR/lab"
  else
    say "no $backflow yet: the repository is not initialised (backflow init, with DIR/env)"
  fi
}

up() {
  [ $# -eq 1 ] || usage
  check_tools
  check_garage
  if [ -e "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ]; then
    die "$1 exists and is not empty: up makes a lab in a new or empty directory"
  fi
  mkdir -p "$1"
  DIR=$(cd "$1" && pwd)
  chmod 0755 "$DIR"
  LAB=${LAB:-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
  [[ "$LAB" =~ ^[a-z0-9]{1,9}$ ]] || die "LAB=$LAB: at most 9 of a-z and 0-9 (it names interfaces)"
  ip netns list | grep -q "^bf-$LAB-" && die "a lab $LAB exists already (ip netns list)"
  # The marker `down` trusts, written first so that `down` can undo a failed `up`.
  echo "LAB=$LAB" >"$DIR/lab"
  # Held until up ends: a `down` that starts meanwhile (the reaper of a test process that died
  # while its lab came up) waits for it instead of racing it. Not passed on to the daemons.
  exec 8>"$DIR/.lock"
  flock 8
  names
  trap 'up_failed $?' EXIT
  mkdir -p "$DIR/pids" "$DIR/ns"
  for h in "${HOSTS[@]}"; do mkdir -p "$DIR/hosts/$h"; done
  # Persistent mount namespaces are bind mounts of files that must not sit on a shared mount.
  mount --bind "$DIR/ns" "$DIR/ns"
  mount --make-private "$DIR/ns"
  make_network
  make_ssh
  make_pki
  {
    echo "127.0.0.1 localhost"
    for h in "${HOSTS[@]}"; do echo "$(host_addr "$h") $h"; done
  } >"$DIR/etc-hosts"
  for h in "${HOSTS[@]}"; do
    make_host "$h"
    start_libvirt "$h"
    start_sshd "$h"
  done
  start_garage
  for h in "${HOSTS[@]}"; do wait_host "$h"; done
  set_up_garage
  make_vms
  write_files
  trap - EXIT
  status_of
}

up_failed() {
  [ "$1" -eq 0 ] && return 0
  say "up failed; what was made stays for a look (logs in $DIR/hosts/*, $DIR/garage/log):"
  say "  bash $0 down $DIR   removes it"
}

# --- status ---------------------------------------------------------------------------------

status_of() {
  local h name host disk
  echo "lab $LAB in $DIR (subnet $SUBNET.0/24, bridge br0 in namespace $HUB)"
  echo "  controller (root namespace): $SUBNET.$ROOT_OCTET on $ROOT_IF"
  for h in "${HOSTS[@]}"; do
    echo "  $h: $(host_addr "$h") in namespace $(host_ns "$h"): libvirtd $(state "$h-libvirtd")," \
      "sshd $(state "$h-sshd"), virtlogd $(state "$h-virtlogd")"
    echo "      $(host_uri "$h")"
  done
  echo "  store: Garage at http://$SUBNET.$STORE_OCTET:$S3_PORT in namespace $STORE_NS" \
    "($(state garage)), repository s3://$BUCKET/$PREFIX"
  if [ -f "$DIR/vms" ]; then
    while read -r name host disk; do
      echo "  VM $name on $host: $disk"
    done <"$DIR/vms"
  fi
  echo "  files: $DIR/cluster.yaml, $DIR/job.yaml, $DIR/env (set -a; . $DIR/env; set +a)"
}

state() { # state NAME: "pid N" or "stopped"
  local pid
  if pid=$(pid_of "$1"); then echo "pid $pid"; else echo stopped; fi
}

# --- down -------------------------------------------------------------------------------------

down() {
  [ $# -eq 1 ] || usage
  [ "$(id -u)" -eq 0 ] || die "run as root"
  if [ ! -e "$1" ]; then
    return 0
  fi
  if [ ! -f "$1/lab" ]; then
    # An empty directory is what a failed `up` leaves before its marker; anything else is not
    # the lab's to remove.
    rmdir "$1" 2>/dev/null || die "$1 is not a lab's directory (no $1/lab): left alone"
    return 0
  fi
  load "$1"
  exec 8>>"$DIR/.lock"
  flock 8
  local h ns f pid
  # The hosts at once (destroying a VM takes seconds), and on each host the VMs first: killing
  # libvirtd leaves their QEMU processes running.
  for h in "${HOSTS[@]}"; do stop_host_all "$h" & done
  stop garage
  wait
  # What else runs in the lab's namespaces: QEMU processes a stopped libvirtd left, servers and
  # ssh sessions that tests started on the hosts (only processes in these namespaces).
  for ns in "${HOSTS[@]}" s3 hub; do
    ns=bf-$LAB-$ns
    if [ -e "/run/netns/$ns" ]; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do
        kill -KILL "$pid" 2>/dev/null || true
      done
    fi
  done
  for f in "$DIR"/ns/*.mnt "$DIR"/ns/*.uts "$DIR/ns"; do
    if mountpoint -q "$f" 2>/dev/null; then umount "$f"; fi
  done
  for ns in "${HOSTS[@]}" s3 hub; do
    if [ -e "/run/netns/bf-$LAB-$ns" ]; then ip netns del "bf-$LAB-$ns"; fi
  done
  # Deleting the hub's namespace removes this veth's peer, and the kernel then removes this end
  # in the background: it may be gone between the check and the delete.
  if ip link show "$ROOT_IF" >/dev/null 2>&1 && ! ip link del "$ROOT_IF" 2>/dev/null; then
    if ip link show "$ROOT_IF" >/dev/null 2>&1; then die "cannot remove $ROOT_IF"; fi
  fi
  # libvirt's ssh transport (no_verify=1) added the hosts' keys to root's known_hosts (ssh finds
  # it through the password database, not $HOME).
  if [ -n "${SUBNET:-}" ] && [ -f "$(getent passwd root | cut -d: -f6)/.ssh/known_hosts" ]; then
    for h in "${HOSTS[@]}"; do
      if ssh-keygen -F "$(host_addr "$h")" >/dev/null 2>&1; then
        ssh-keygen -R "$(host_addr "$h")" >/dev/null 2>&1 || true
      fi
    done
  fi
  if findmnt -rn -o TARGET | grep -qF "$DIR/"; then
    die "mounts under $DIR remain: $(findmnt -rn -o TARGET | grep -F "$DIR/" | tr '\n' ' ')"
  fi
  rm -rf "$DIR"
  say "lab $LAB removed"
}

stop_host_all() { # stop_host_all HOST: its VMs, then its daemons
  local h=$1 name
  if pid_of "$h-libvirtd" >/dev/null && [ -n "${SUBNET:-}" ]; then
    for name in $(virsh_on "$h" list --name 2>/dev/null); do
      virsh_on "$h" destroy "$name" >/dev/null 2>&1 &
    done
    wait
  fi
  stop "$h-sshd"
  stop "$h-libvirtd"
  stop "$h-virtlogd"
}

# --- faults and access ----------------------------------------------------------------------

need_host() {
  host_index "$1" >/dev/null
  [ -n "${SUBNET:-}" ] || die "the lab in $DIR has no network"
}

case "${1:-}" in
  up)
    shift
    up "$@"
    ;;
  down)
    shift
    down "$@"
    ;;
  status)
    [ $# -eq 2 ] || usage
    load "$2"
    status_of
    ;;
  exec)
    [ $# -ge 4 ] || usage
    load "$2"
    need_host "$3"
    h=$3
    shift 3
    in_host "$h" "$@"
    ;;
  cut | restore)
    [ $# -eq 3 ] || usage
    load "$2"
    need_host "$3"
    # The host's cable at the switch: its eth0 loses carrier, its routes and sockets stay (as
    # when a cable is pulled), and nothing reaches it or leaves it until `restore`.
    ip -n "$HUB" link set "$3" "$([ "$1" = cut ] && echo down || echo up)"
    ;;
  stop-host)
    [ $# -eq 3 ] || usage
    load "$2"
    need_host "$3"
    # The host's management goes away (SIGTERM, as at a shutdown of the services); its VMs keep
    # running (QEMU does not depend on libvirtd) and so do ssh sessions already open.
    stop "$3-sshd"
    stop "$3-libvirtd"
    ;;
  start-host)
    [ $# -eq 3 ] || usage
    load "$2"
    need_host "$3"
    pid_of "$3-libvirtd" >/dev/null || start_libvirt "$3"
    pid_of "$3-sshd" >/dev/null || start_sshd "$3"
    wait_host "$3"
    ;;
  migrate)
    [ $# -eq 4 ] || usage
    load "$2"
    need_host "$4"
    from=
    for h in "${HOSTS[@]}"; do
      if [ "$(virsh_on "$h" domstate "$3" 2>/dev/null)" = running ]; then from=$h; fi
    done
    [ -n "$from" ] || die "VM $3 runs on no host of lab $LAB"
    [ "$from" != "$4" ] || die "VM $3 runs on $4 already"
    # Live, driven from the controller's side through both hosts' URIs. --unsafe: libvirt calls
    # only network file systems shared storage, and DIR/shared is a local one that every host
    # sees. The definition moves with the VM.
    virsh -q -c "$(host_uri "$from")" migrate --live --unsafe --persistent --undefinesource \
      "$3" "$(host_uri "$4")"
    say "VM $3 moved from $from to $4"
    ;;
  add-vm)
    [ $# -eq 4 ] || usage
    load "$2"
    need_host "$3"
    add_vm "$3" "$4"
    ;;
  *) usage ;;
esac
