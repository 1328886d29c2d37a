#!/usr/bin/env bash
# Fuzzes the NBD client's reply parsing (fuzz/fuzz_targets/replies.rs) for SECONDS (default 60) and
# fails on a crash, a panic, an input that runs longer than 10 s (a hang) or an out-of-memory.
# Installs cargo-fuzz when missing. cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them. A failing input is saved under fuzz/artifacts/replies/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run replies fuzz/artifacts/replies/<file>
# The corpus grows in fuzz/corpus/replies (not versioned); it starts from the seeds of fuzz/make_seeds.py.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
python3 fuzz/make_seeds.py fuzz/corpus/replies
cargo fuzz build replies
echo "fuzz: running the replies target for ${seconds} s" >&2
cargo fuzz run replies -- -max_total_time="$seconds" -timeout=10 -print_final_stats=1
