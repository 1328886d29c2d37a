#!/usr/bin/env bash
# Installs what building and testing Backflow needs on Debian 12, when it is missing.
# Idempotent and quiet when everything is there. Runs as root (or through sudo when available).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null && SUDO="sudo" || { echo "setup: run as root to install packages" >&2; exit 1; }
fi

# Debian packages the build and the tests use: a C compiler for zstd-sys, cmp (diffutils), kill
# (procps, to signal backups by pid).
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v cmp >/dev/null || need+=(diffutils)
command -v kill >/dev/null || need+=(procps)
# qemu-nbd and qemu-img: the NBD client's interoperability tests. A fresh machine of this kind has
# a newer qemu-utils already; Debian's is installed only when none is there.
command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null || need+=(qemu-utils)
# nbdkit and nbdinfo (libnbd-bin): the NBD client's tests against a second server and a second
# client; nbdinfo and nbdcopy (libnbd-bin) also read `backflow serve`'s exports in its tests and
# benches/serve.sh. Installing them from Debian 12 removes and upgrades nothing (checked with apt-get -s), so the
# newer qemu-utils stays.
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null || need+=(libnbd-bin)
# tmux: the progress test drives the real binary on a terminal and reads the screen back.
command -v tmux >/dev/null || need+=(tmux)
# libvirt's client library and headers: the `virt` crate of the libvirt connector links it (found
# through pkg-config); its tests use libvirt's in-process test driver, no daemon. Removes nothing.
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev)
# python3 writes the NBD fuzzer's seed conversations (fuzz/make_seeds.py); libFuzzer itself is built
# by cargo-fuzz with the C++ compiler of build-essential.
command -v python3 >/dev/null || need+=(python3)
# aiosmtpd: the notification tests mail reports to a real SMTP server on loopback
# (testkit/smtp_server.py). Debian's package serves /usr/bin/python3, which the tests also try
# when the python3 on the PATH (pyenv, venv) lacks it.
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || python3 -c 'import aiosmtpd' 2>/dev/null \
  || need+=(python3-aiosmtpd)
# systemd-analyze (systemd): the test that checks dist/backflow-daemon.service with `verify`.
command -v systemd-analyze >/dev/null || need+=(systemd)
# restic: the independent S3 client that checks the test harness's object stores (and the peer of
# the S3 benchmarks); ip (iproute2): the network namespaces of the three-node Garage cluster.
command -v restic >/dev/null || need+=(restic)
command -v ip >/dev/null || need+=(iproute2)
# sshd (openssh-server; ssh and ssh-keygen come with it) and certtool (gnutls-bin): the hosts of
# the cluster lab (scripts/cluster.sh) each run an sshd of their own, and NBD between them is TLS
# with certificates the lab and the tests make (testkit/src/pki.rs), as libvirt's and QEMU's TLS
# documentation makes them. (Where policy-rc.d forbids starting services, as in containers, the
# package's own sshd is not started.)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
# tcpdump: the cluster tests capture NBD between the lab's hosts (it must cross, encrypted).
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v certtool >/dev/null || need+=(gnutls-bin)
# Restore points as running VMs and as files (issue 15): sgdisk (gdisk), mkfs.xfs (xfsprogs) and
# mkfs.fat/mtools/syslinux make the test disks (a partitioned disk with known files; a disk that
# boots Debian's kernel with a busybox initramfs), depmod (kmod) indexes the guest kernel's modules.
# (guestfish comes after QEMU, below.)
command -v sgdisk >/dev/null || need+=(gdisk)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.fat >/dev/null || need+=(dosfstools)
command -v mcopy >/dev/null || need+=(mtools)
command -v syslinux >/dev/null && [ -f /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux syslinux-common)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
# chromium and chromedriver (chromium-driver): the web console's tests drive the daemon's pages in
# a real headless browser over WebDriver (testkit/src/webdriver.rs). Installing them from Debian 12
# removes nothing (checked with apt-get -s; it upgrades libgdk-pixbuf to its security release).
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# libvirtd and QEMU: the tests run throwaway domains on qemu:///system (no OS, no NIC). Installing
# qemu-system-x86 from Debian 12 removes the newer qemu-utils of a fresh machine and leaves no
# qemu-img at all, so Debian's qemu-utils (7.2) and libnbd-bin are installed again right after.
if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null \
  || ! command -v qemu-system-x86_64 >/dev/null; then
  echo "setup: installing libvirt and QEMU" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    libvirt-daemon-system libvirt-clients qemu-system-x86 >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-utils libnbd-bin >/dev/null
fi
# guestfish (libguestfs-tools): file-level restore reads the filesystems of an exported disk in
# its appliance. It needs Debian's QEMU, which the block above installs first on a fresh machine
# (installed before it, it would pull qemu-system-x86 in over the newer qemu-utils).
if ! command -v guestfish >/dev/null; then
  echo "setup: installing libguestfs-tools" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libguestfs-tools >/dev/null
fi
for tool in qemu-img qemu-io qemu-nbd; do
  if ! "$tool" --version >/dev/null 2>&1; then
    echo "setup: $tool does not run after installing QEMU (apt-get install qemu-utils?)" >&2
    exit 1
  fi
done
# The guest kernel (issue 15): Debian's current linux-image-amd64, unpacked (not installed: no
# initramfs, no boot loader) into $BACKFLOW_TOOLS/kernel/VERSION/{vmlinuz,modules}, `current` naming
# it, and its modules into /lib/modules/VERSION (depmod), where supermin looks for them: machines
# like these boot a kernel of their own and have none in /boot, which libguestfs's appliance and
# the bootable test disks need. kernel/env holds the SUPERMIN_* variables that point supermin at it.
KTOOLS=${BACKFLOW_TOOLS:-/opt/backflow-tools}/kernel
if [ ! -f "$KTOOLS/current/vmlinuz" ] || [ ! -f "/lib/modules/$(cat "$KTOOLS/current/version" 2>/dev/null)/modules.dep" ]; then
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$kpkg" ]; then
    $SUDO apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  kver=${kpkg#linux-image-}
  echo "setup: unpacking the guest kernel $kver into $KTOOLS" >&2
  kdl=$(mktemp -d /var/tmp/backflow-kernel.XXXXXX)
  chmod 755 "$kdl"
  (cd "$kdl" && $SUDO apt-get download -q "$kpkg" >/dev/null 2>&1) \
    || { echo "setup: apt-get download $kpkg failed" >&2; exit 1; }
  $SUDO dpkg-deb -x "$kdl"/linux-image-*.deb "$kdl/root"
  $SUDO mkdir -p "$KTOOLS/$kver" /lib/modules
  $SUDO cp "$kdl/root/boot/vmlinuz-$kver" "$KTOOLS/$kver/vmlinuz"
  $SUDO rm -rf "/lib/modules/$kver"
  $SUDO cp -a "$kdl/root/lib/modules/$kver" "/lib/modules/$kver"
  $SUDO depmod "$kver"
  $SUDO ln -sfn "/lib/modules/$kver" "$KTOOLS/$kver/modules"
  echo "$kver" | $SUDO tee "$KTOOLS/$kver/version" >/dev/null
  printf 'SUPERMIN_KERNEL=%s\nSUPERMIN_MODULES=%s\nSUPERMIN_KERNEL_VERSION=%s\n' \
    "$KTOOLS/$kver/vmlinuz" "/lib/modules/$kver" "$kver" | $SUDO tee "$KTOOLS/$kver/env" >/dev/null
  $SUDO ln -sfn "$kver" "$KTOOLS/current"
  $SUDO rm -rf "$kdl"
fi

# promtool: the tests check the example alert rules (dist/backflow-alerts.yml, `promtool check rules`
# and `promtool test rules`) and the daemon's /metrics (`promtool check metrics`). Only the tool is
# wanted, not a Prometheus service: Debian 12's prometheus package is downloaded and unpacked (not
# installed) and its promtool copied to $BACKFLOW_TOOLS/bin.
PTOOL=${BACKFLOW_TOOLS:-/opt/backflow-tools}/bin/promtool
if ! "$PTOOL" --version >/dev/null 2>&1; then
  echo "setup: unpacking promtool from Debian's prometheus into $PTOOL" >&2
  pdl=$(mktemp -d /var/tmp/backflow-promtool.XXXXXX)
  chmod 755 "$pdl"
  (cd "$pdl" && $SUDO apt-get download -q prometheus >/dev/null 2>&1) \
    || { $SUDO apt-get update -qq && (cd "$pdl" && $SUDO apt-get download -q prometheus >/dev/null 2>&1); } \
    || { echo "setup: apt-get download prometheus failed" >&2; exit 1; }
  $SUDO dpkg-deb -x "$pdl"/prometheus_*.deb "$pdl/root"
  $SUDO mkdir -p "$(dirname "$PTOOL")"
  $SUDO install -m 755 "$pdl/root/usr/bin/promtool" "$PTOOL"
  $SUDO rm -rf "$pdl"
  "$PTOOL" --version >/dev/null || { echo "setup: $PTOOL does not run" >&2; exit 1; }
fi
# schemathesis (PyPI; `st`): the tests check the daemon's OpenAPI document against the running
# server. It lives in a venv of its own at $BACKFLOW_TOOLS/venv, made with Debian's /usr/bin/python3
# (3.11 on Debian 12; python3-venv gives it ensurepip), not with whatever python3 is first on the
# PATH (pyenv's here), so that the venv does not depend on a user's interpreter. The version is
# pinned: the tests rely on its CLI (`st run SCHEMA --url BASE ...`), which changes between majors.
SCHEMATHESIS_VERSION=4.32.5
STVENV=${BACKFLOW_TOOLS:-/opt/backflow-tools}/venv
if ! "$STVENV/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "setup: installing python3-venv" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "setup: installing schemathesis $SCHEMATHESIS_VERSION into $STVENV" >&2
  [ -x "$STVENV/bin/pip" ] || $SUDO /usr/bin/python3 -m venv "$STVENV"
  $SUDO "$STVENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" \
    || { echo "setup: pip install schemathesis==$SCHEMATHESIS_VERSION failed" >&2; exit 1; }
  "$STVENV/bin/st" --version | grep -qF "$SCHEMATHESIS_VERSION" \
    || { echo "setup: $STVENV/bin/st is not schemathesis $SCHEMATHESIS_VERSION" >&2; exit 1; }
fi

# Starts virtlogd and libvirtd when no libvirtd answers (no systemd here); they keep running for
# the tests. `bash scripts/libvirtd.sh stop` stops what it started.
$SUDO bash "$(dirname "$0")/libvirtd.sh" start

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing: install the Rust toolchain (rustup) first" >&2
  exit 1
fi

# The object stores of the S3 tests (testkit/src/s3.rs): Garage and s3s-fs, from crates.io, into
# $BACKFLOW_TOOLS (default /opt/backflow-tools), once per machine. Garage takes about 26 minutes to
# build on a loaded machine, so the builds run in the background (niced, so that the workspace's
# own build goes first) and overlap the rest of the test command; the harness waits for them and
# shows the end of the log when one fails. State per tool in TOOLS/build: NAME.pid (the build),
# NAME.log, NAME.status (its exit status, written when it ends).
TOOLS=${BACKFLOW_TOOLS:-/opt/backflow-tools}
# build_tool NAME VERSION CRATE [CARGO_INSTALL_ARGS...]: starts the build of NAME unless
# TOOLS/bin/NAME is that version already or a build of it runs.
build_tool() {
  local name=$1 version=$2 crate=$3 build=$TOOLS/build
  shift 3
  if "$TOOLS/bin/$name" --version 2>/dev/null | grep -qF "$version"; then
    rm -f "$build/$name.status" "$build/$name.pid" # a failed build's, from before it was fixed
    return 0
  fi
  mkdir -p "$build" 2>/dev/null || {
    echo "setup: cannot write $TOOLS: run as root or set BACKFLOW_TOOLS to a directory of yours" >&2
    exit 1
  }
  if [ -f "$build/$name.pid" ] && [ ! -f "$build/$name.status" ] \
    && kill -0 "$(cat "$build/$name.pid")" 2>/dev/null; then
    echo "setup: $name $version is being built (log: $build/$name.log)" >&2
    return 0
  fi
  rm -f "$build/$name.status"
  echo "setup: building $name $version in the background (log: $build/$name.log)" >&2
  # Its own target directory (cargo's default, a temporary one): never the workspace's.
  nohup nice -n 10 env -u CARGO_TARGET_DIR bash -c \
    '"$@" >"$0.log" 2>&1; echo $? >"$0.status.tmp"; mv "$0.status.tmp" "$0.status"' \
    "$build/$name" cargo install --locked --root "$TOOLS" "$crate" --version "$version" "$@" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$build/$name.pid"
}
build_tool garage 2.5.0 garage --no-default-features --features bundled-libs,lmdb,sqlite
build_tool s3s-fs 0.14.1 s3s-fs --features binary
# The test command checks formatting and lints too.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
      rustup component add "$component"
    else
      echo "setup: cargo $component is missing and there is no rustup to add it" >&2
      exit 1
    fi
  fi
done
