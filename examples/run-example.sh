#!/usr/bin/env bash
# examples/run-example.sh: how ctest runs an example and checks what it printed.
#
#   run-example.sh [--redis] [--postgres] [--after REGEX --run SHELL]... [--expect REGEX=COUNT]...
#                  -- PROGRAM ARGS
#
# In PROGRAM's arguments, @TMP@ becomes a fresh temporary directory, @REDIS@ the address
# (127.0.0.1:PORT) of a throwaway redis-server that --redis starts, and @POSTGRES@ the
# connection string of a throwaway PostgreSQL cluster that --postgres starts (as the user
# postgres when run as root): on loopback, a free port, no persistence, files in the temporary
# directory. Each --after waits (up to 60 s) until a
# line of the output matches REGEX, then runs SHELL, which sees $pid (signals sent to it reach
# the program), $out (the output file) and $tmp, may call wait_for SECONDS COMMAND..., and
# adds the processes it starts to the array `others` (killed at the end). Passes if the
# program exits 0 within 120 s and, for each --expect, exactly COUNT lines of its output match
# REGEX. Without the server the test is skipped (exit 77), except in CI ($CI set): it fails.
set -euo pipefail
redis=0 postgres=0 afters=() runs=() expects=()
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --redis) redis=1 ;;
    --postgres) postgres=1 ;;
    --after) afters+=("$2") && shift ;;
    --run) runs+=("$2") && shift ;;
    --expect) expects+=("$2") && shift ;;
    *) echo "run-example: unknown option $1" >&2 && exit 2 ;;
  esac
  shift
done
shift
tmp=$(mktemp -d "${TMPDIR:-/tmp}/workerlock-example.XXXXXX")
out=$tmp/output pid= server= cluster= others=()
cleanup() {
  set +e
  for other in "${others[@]}"; do kill -KILL "$other" 2>/dev/null; done
  [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  [[ -n $cluster ]] && as_owner "$bindir/pg_ctl" -D "$cluster" -m immediate -w stop >/dev/null 2>&1
  rm -rf "$tmp"
  return 0  # an explicit exit status (0, 1, 77) stands
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2 && echo "--- output ---" >&2 && cat "$out" >&2 && exit 1; }
wait_for() {  # wait_for SECONDS COMMAND...: true once COMMAND succeeds, false when time is up
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do ((SECONDS < deadline)) || return 1 && sleep 0.1; done
}

missing() { echo "$1 not found ($2)" >&2 && { [[ -n ${CI:-} ]] && exit 1 || exit 77; }; }

address=
if ((redis)); then
  binary=${WORKERLOCK_REDIS_SERVER:-$(command -v redis-server || true)}
  [[ -x $binary ]] || missing redis-server "apt-get install redis-server"
  for _ in $(seq 1 20); do  # a random port, again if it was taken
    port=$((20000 + RANDOM % 40000))
    "$binary" --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$tmp" \
      --logfile "$tmp/redis.log" &
    server=$!
    ready() { grep -q "Ready to accept" "$tmp/redis.log" 2>/dev/null || ! kill -0 "$server" 2>/dev/null; }
    wait_for 10 ready || true
    kill -0 "$server" 2>/dev/null && grep -q "Ready to accept" "$tmp/redis.log" && break
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=
  done
  [[ -n $server ]] || { echo "redis-server did not start" >&2 && cat "$tmp/redis.log" >&2 && exit 1; }
  address=127.0.0.1:$port
fi

conninfo=
as_owner() { if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi; }
if ((postgres)); then
  bindir=${WORKERLOCK_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  [[ -x $bindir/initdb ]] || missing "PostgreSQL's initdb" "apt-get install postgresql"
  mkdir "$tmp/pg"
  if ((EUID == 0)); then chmod 711 "$tmp" && chown postgres: "$tmp/pg"; fi
  as_owner "$bindir/initdb" -D "$tmp/pg/data" -A trust -U postgres --no-sync >"$tmp/pg/initdb.log" 2>&1 ||
    { cat "$tmp/pg/initdb.log" >&2 && exit 1; }
  printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nfsync = off\n" \
    "$tmp/pg" >>"$tmp/pg/data/postgresql.conf"
  for _ in $(seq 1 10); do  # a random port, again if it was taken
    port=$((20000 + RANDOM % 40000))
    if as_owner "$bindir/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/server.log" -w -t 60 \
      -o "-p $port" start >/dev/null; then
      cluster=$tmp/pg/data
      break
    fi
  done
  [[ -n $cluster ]] || { echo "PostgreSQL did not start" >&2 && cat "$tmp/pg/server.log" >&2 && exit 1; }
  conninfo="host=127.0.0.1 port=$port user=postgres dbname=postgres"
fi

args=()
for arg in "$@"; do
  arg=${arg//@TMP@/$tmp}
  arg=${arg//@REDIS@/$address}
  args+=("${arg//@POSTGRES@/$conninfo}")
done
: >"$out"
timeout --kill-after=10 120 "${args[@]}" >"$out" 2>&1 &
pid=$!  # timeout's, which passes signals on to the program
for i in "${!afters[@]}"; do
  wait_for 60 grep -qE "${afters[$i]}" "$out" || fail "no line matched '${afters[$i]}' in 60 s"
  eval "${runs[$i]}" || fail "'${runs[$i]}' failed"
done
status=0
wait "$pid" || status=$?
pid=
[[ $status -ne 124 ]] || fail "still running after 120 s"
[[ $status -eq 0 ]] || fail "exit status $status"
for expect in "${expects[@]}"; do
  regex=${expect%=*} count=${expect##*=}
  found=$(grep -cE "$regex" "$out" || true)
  [[ $found -eq $count ]] || fail "$found lines matched '$regex', expected $count"
done
cat "$out"
echo "run-example: OK"
exit 0
