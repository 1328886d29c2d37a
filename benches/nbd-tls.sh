#!/usr/bin/env bash
# One NBD export read whole by backflow-nbd's client over three transports, in the same run:
#   unix       a unix socket: the VM's host reading its own export (the local read)
#   tcp        TCP on loopback, no TLS
#   tcp+tls    TCP on loopback with NBD_OPT_STARTTLS (rustls/ring against QEMU's GnuTLS,
#              verify-peer=on, certificates made by testkit::pki with certtool)
# what a worker on another host pays for the cluster's fallback (issue 14), as a ratio to the
# local read. The image is MIB of pseudo-random data in a qcow2 (every byte crosses the
# transport), one qemu-nbd per transport; a warm-up round checks every byte, then 3 rounds,
# interleaved. Prints a Markdown table: median seconds, MiB/s, client CPU, ratio to unix.
# The benchmark itself is benches/benches/nbd_transport.rs.
#
#   bash benches/nbd-tls.sh [MIB]          default 1024; needs about 2x MIB free in $BENCH_DIR
#
# Loopback measures the cost of the protocol and the encryption on this machine, not a network:
# on a real link the slower of the link and these numbers wins.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
export BENCH_DIR=${BENCH_DIR:-/var/tmp}

for tool in qemu-img qemu-nbd certtool; do
  command -v $tool >/dev/null || { echo "$tool is required (Debian: qemu-utils, gnutls-bin)" >&2; exit 1; }
done
cargo bench -q -p backflow-benches --bench nbd_transport -- "$MIB"
