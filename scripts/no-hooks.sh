#!/usr/bin/env bash
# Checks that a default release build has no test hooks, and leaves target/release/backflow as a
# user gets it. The test hooks (pauses and gc kill points driven by environment variables) exist only
# with the `test-hooks` feature, which the cli's dev-dependencies turn on in every build that includes
# a test target (so target/release/backflow has them after `cargo test`); `cargo build --release -p
# backflow` (the demo, `cargo install`) leaves them out. This builds that way, then runs a backup and
# a gc with the hooks' variables set: a hook would pause the backup before its commit (creating the
# pause file) or kill the gc (SIGKILL). Ends with "no-hooks: ok".
#   bash scripts/no-hooks.sh [--no-build]   (--no-build: check target/release/backflow as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = --no-build ] || cargo build --release -p backflow
bf=target/release/backflow
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "no-hooks: $*" >&2; exit 1; }
"$bf" init --repo "$dir/repo" >/dev/null
head -c 4194304 /dev/urandom >"$dir/disk.img"
pause="$dir/paused"
# A hooked backup would wait up to ten minutes for the pause file to go: the timeout ends it sooner.
status=0
BACKFLOW_PAUSE_BEFORE_COMMIT="$pause" timeout -k 10 60 "$bf" run specs/backup-image.yaml \
    --var source="$dir/disk.img" --var repo="$dir/repo" --var disk=disk0 --quiet || status=$?
[ ! -e "$pause" ] || fail "the backup paused before its commit: the build has test hooks"
[ "$status" = 0 ] || fail "the backup failed (status $status) with BACKFLOW_PAUSE_BEFORE_COMMIT set"
status=0
BACKFLOW_GC_KILL_AT=marked "$bf" gc --repo "$dir/repo" >/dev/null || status=$?
[ "$status" = 0 ] || fail "gc with BACKFLOW_GC_KILL_AT=marked exited with status $status (137: killed by its hook)"
echo "no-hooks: ok"
