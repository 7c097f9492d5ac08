#!/usr/bin/env bash
# examples/fencing_store/run-with-redis.sh: starts a throwaway redis-server on 127.0.0.1 (a free
# port, no persistence, files in a temporary directory), runs the example against it, stops it.
#   run-with-redis.sh path/to/workerlock_fencing_store
set -euo pipefail
example=$1
server=${WORKERLOCK_REDIS_SERVER:-$(command -v redis-server || true)}
[[ -x $server ]] || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 1; }
dir=$(mktemp -d)
pid=
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
for attempt in $(seq 1 20); do
  port=$((20000 + RANDOM % 40000))
  "$server" --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" &
  pid=$!
  for _ in $(seq 1 100); do  # up to 10 s
    grep -q "Ready to accept connections" "$dir/redis.log" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || break  # exited: most likely the port was taken
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && grep -q "Ready to accept" "$dir/redis.log" && break
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=
  : >"$dir/redis.log"
done
[[ -n $pid ]] || { echo "redis-server did not start" >&2; cat "$dir/redis.log" >&2; exit 1; }
"$example" "127.0.0.1:$port"
