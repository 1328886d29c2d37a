#!/usr/bin/env bash
# The demo on an embedded default: builds Backflow, generates a disk image, backs it up into a
# local repository, changes 5% of it, backs it up again, restores both restore points, compares
# them with cmp and prints the per-stage summaries. Everything goes to ./backflow-demo.
#   bash scripts/demo.sh [--size 2G]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p backflow
exec target/release/backflow demo --dir backflow-demo "$@"
