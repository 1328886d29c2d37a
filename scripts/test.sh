#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting, lints (clippy, warnings denied)
# and the documentation (cargo doc, warnings denied), then runs every test of the workspace
# (unit tests, integration tests against real files, repositories and processes, every spec file,
# the 2 GiB round trip), in release mode (the test targets' builds have the test hooks: see
# scripts/no-hooks.sh, which then checks that a default build has none and rebuilds
# target/release/backflow without them), then fuzzes the NBD client for 30 s (scripts/fuzz.sh).
# Ends with one line: "tests: N passed, N failed, N skipped".
# The S3 tests' stores (Garage, s3s-fs) are built once per machine into /opt/backflow-tools; setup
# starts those builds first thing, in the background, so that they overlap the checks and the
# workspace's build (a fresh machine's Garage takes about 26 minutes); the tests that need a store
# wait for its build (testkit/src/s3.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Checks first: formatting, lints and the documentation (broken links, warnings) fail the run.
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps
cargo build --release --workspace --all-targets
log=$(mktemp)
status=0
# Every test binary, as `cargo test` would run it (from its package's directory), in two rounds:
# first those that need no object store, then those that do (s3_*, object_stores, and cluster_*:
# the cluster lab's store is a Garage), so that a fresh
# machine's Garage build, started in the background by setup.sh, overlaps the other tests instead
# of holding them up (the first test to need it waits for it). The workspace has no doctests (its
# examples are `text` blocks, checked by cargo doc above).
bins=$(mktemp)
trap 'rm -f "$log" "$bins"' EXIT
cargo test --release --workspace --no-run --message-format=json 2>/dev/null \
  | grep '"profile":{[^}]*"test":true' \
  | sed -n 's/.*"manifest_path":"\([^"]*\)".*"executable":"\([^"]*\)".*/\1 \2/p' >"$bins"
# As cargo runs them: a proc-macro crate's tests link the toolchain's libstd dynamically.
LD_LIBRARY_PATH="$(rustc --print target-libdir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
run_bins() { # run_bins first|last [TEST ARGS...]
  local round=$1 manifest exe name
  shift
  while read -r manifest exe; do
    name=$(basename "$exe")
    name=${name%-*}
    case "$name" in s3_* | object_stores | cluster_*) [ "$round" = last ] || continue ;;
      *) [ "$round" = first ] || continue ;; esac
    echo "     Running $name ($exe)"
    (cd "$(dirname "$manifest")" && "$exe" "$@") || status=1
  done <"$bins"
}
{
  run_bins first "$@"
  run_bins last "$@"
  exit "$status"
} 2>&1 | tee "$log" || status=$?
# The tests' builds have the test hooks (cli's dev-dependencies); the binary a user builds has none.
bash scripts/no-hooks.sh || status=$?
bash scripts/fuzz.sh 30 || status=$?  # the NBD reply parser under libFuzzer; a crash fails the run
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
exit "$status"
