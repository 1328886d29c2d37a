# Shared by the end-to-end scripts (sourced, not run): installs the peers, builds backflow, makes
# the work directory $WORK (removed on exit) and defines the measuring helpers.
#   peers_setup [COMMAND:PACKAGE...]   extra tools to install when their command is missing

peers_setup() {
  local need=() pair
  command -v restic >/dev/null || need+=(restic)
  command -v borg >/dev/null || need+=(borgbackup)
  [ -x /usr/bin/time ] || need+=(time)
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  cargo build --release -q -p backflow -p backflow-fixtures
  BF=$PWD/target/release/backflow
  FX=$PWD/target/release/backflow-fixtures
  rm -rf "$WORK"; mkdir -p "$WORK"
  trap 'rm -rf "$WORK"' EXIT
  export RESTIC_PASSWORD=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
}

# measure NAME CMD...: runs CMD under GNU time; appends "NAME seconds max_rss_kib" to $WORK/times.
measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/t" "$@" >"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log" >&2; exit 1; }
  echo "$name $(cat "$WORK/t")" >>"$WORK/times"
}
size_of() { du -sb "$1" | cut -f1; }
get() { awk -v k="$1" '$1==k {print $'"$2"'}' "$WORK/times"; }
# json_num KEY FILE: the first number under "KEY" in the JSON report FILE (one key a line).
json_num() { awk -F'[:,]' -v k="\"$1\"" '$1 ~ k {gsub(/ /, "", $2); print $2 + 0; exit}' "$2"; }

# change_blocks BYTES SEED: the 5% change of the end-to-end scripts. Sets BLOCK (64 KiB) and WANT
# (5% of the BYTES / BLOCK blocks); prints WANT lines "BLOCK_INDEX PATTERN": distinct blocks drawn
# by a 64-bit LCG from SEED (bash arithmetic wraps the same everywhere), each with a non-zero
# byte pattern. Call it without a subshell (BLOCK and WANT are for the caller): redirect its output.
change_blocks() {
  local blocks state r block
  BLOCK=65536
  blocks=$(($1 / BLOCK))
  WANT=$((blocks * 5 / 100))
  local -A taken=()
  state=$2
  while [ ${#taken[@]} -lt "$WANT" ]; do
    state=$(( state * 6364136223846793005 + 1442695040888963407 )); r=$(( (state >> 33) & 0x7fffffff ))
    block=$((r % blocks))
    [ -n "${taken[$block]:-}" ] && continue
    taken[$block]=1
    state=$(( state * 6364136223846793005 + 1442695040888963407 )); r=$(( (state >> 33) & 0x7fffffff ))
    echo "$block $((1 + r % 255))"
  done
}
