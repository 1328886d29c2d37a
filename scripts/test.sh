#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every test of the workspace
# (unit, integration against real files and processes, the spec files, the 2 GiB round trip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace "$@"
