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
