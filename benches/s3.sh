# Shared by the S3 benchmark scripts (sourced after peers.sh and its peers_setup, which sets WORK
# and `measure`): a store of the test harness for the script's lifetime, and restic's S3 backend
# measured against it.
#   s3_store KIND                 starts `backflow-test-store KIND` (garage: one Garage node on
#                                 loopback; garage-cluster: three in network namespaces; s3s-fs) as
#                                 a coprocess; exports the AWS variables, S3_BUCKET (a new bucket)
#                                 and S3_PIDS (the servers). The store is stopped by pid and its
#                                 files removed when the script exits (its stdin closes).
#   restic_s3 NAME PREFIX FILE    restic's S3 backend on s3:ENDPOINT/BUCKET/PREFIX: init, backup of
#                                 FILE, restore of that snapshot, checked with cmp. The backup and
#                                 the restore are measured (GNU time: wall seconds, peak RSS) as
#                                 NAME_backup and NAME_restore in $WORK/times.
# restic keeps its cache (index, trees) in $WORK/restic-cache, as an operator's restic would in
# ~/.cache: pack data always comes from the store.

s3_store() {
  cargo build --release -q -p backflow-testkit --bin backflow-test-store
  coproc S3_STORE { "$PWD/target/release/backflow-test-store" "$1"; }
  local line
  while IFS= read -r line <&"${S3_STORE[0]}"; do
    if [ "$line" = READY ]; then
      echo "s3_store: $1 at $AWS_ENDPOINT_URL, bucket $S3_BUCKET (pids $S3_PIDS)" >&2
      return 0
    fi
    export "${line?}"
  done
  echo "s3_store: backflow-test-store $1 ended before its store was ready" >&2
  exit 1
}

restic_s3() {
  local name=$1 prefix=$2 file=$3
  local repo="s3:$AWS_ENDPOINT_URL/$S3_BUCKET/$prefix" out="$WORK/$name-out"
  export RESTIC_CACHE_DIR=$WORK/restic-cache
  restic -q -r "$repo" init >/dev/null
  measure "${name}_backup" restic -q -r "$repo" backup "$file"
  rm -rf "$out"
  measure "${name}_restore" restic -q -r "$repo" restore latest --target "$out"
  local restored
  restored=$(find "$out" -type f -name "$(basename "$file")")
  cmp "$file" "$restored" || { echo "restic_s3: $name restored different bytes" >&2; exit 1; }
  rm -rf "$out"
}
