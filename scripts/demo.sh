#!/usr/bin/env bash
# The demo on a real running VM, with no configuration: installs libvirt and QEMU when missing and
# starts libvirtd (scripts/setup.sh), builds Backflow, generates a disk image (qcow2) and starts a
# throwaway VM `backflow-demo` on it (qemu:///system; no OS, no network). It backs the VM up with
# specs/backup-vm.yaml (a libvirt pull-mode backup job that leaves a checkpoint), writes 5% of the
# disk through the guest's disk device, backs it up again (incrementally: only what the checkpoint
# recorded), restores both restore points and compares them with copies of the disk taken at each
# backup, restores the second as a new VM `backflow-demo-restored` and shows that it runs, then
# destroys and undefines both VMs. Prints the per-stage summaries. Files go to ./backflow-demo.
#   bash scripts/demo.sh [--size 2G]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p backflow
exec target/release/backflow demo --dir backflow-demo "$@"
