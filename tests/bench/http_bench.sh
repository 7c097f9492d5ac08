#!/usr/bin/env bash
# workerlock: HTTP benchmark of examples/prefork_server, with and without workerlock.
#
#   bash tests/bench/http_bench.sh path/to/workerlock_prefork_server
#
# Two configurations of the same binary serve requests identically:
#   with     (default)          every worker runs a workerlock::Coordinator (a standby
#                               thread blocked in F_OFD_SETLKW), the primary runs the
#                               scheduler (one report line per tick), and GET /status calls
#                               workerlock::lock_holder() (reads /proc/locks and the record)
#   without  (--no-workerlock)  no Coordinator, no scheduler, /status skips lock_holder()
# They run in interleaved rounds (A B, B A, A B, ...) so drift on a shared machine hits both;
# each round starts a fresh server, warms it up for 1 s, then runs wrk once per endpoint.
# Reported: the median req/s per configuration and endpoint, and their ratio.
#
# Then the failover gap: a coordinated server with --tick FAILOVER_TICK under the same wrk
# load has its primary SIGKILLed KILLS times; from the report file, the gap between the last
# tick of the killed primary and the first tick of its successor, and the ticks it cost.
#
# Knobs (environment): ROUNDS=5 DURATION=5 (s per wrk run) THREADS=2 CONNECTIONS=16
# WORKERS=4 TICK=1 ENDPOINTS="/ /status" KILLS=5 FAILOVER_TICK=0.2 WRK=wrk
set -uo pipefail

BIN="${1:?usage: http_bench.sh path/to/workerlock_prefork_server}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-5}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-16}"
WORKERS="${WORKERS:-4}"
TICK="${TICK:-1}"
ENDPOINTS="${ENDPOINTS:-/ /status}"
KILLS="${KILLS:-5}"
FAILOVER_TICK="${FAILOVER_TICK:-0.2}"
WRK="${WRK:-wrk}"

[[ -x "$BIN" ]] || { echo "http_bench: not an executable: $BIN" >&2; exit 2; }
command -v "$WRK" >/dev/null || { echo "http_bench: wrk is required (apt-get install wrk)" >&2; exit 2; }
command -v curl >/dev/null || { echo "http_bench: curl is required" >&2; exit 2; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/workerlock-http-bench.XXXXXX")"
MASTER=""
WRK_PID=""
cleanup() {
  [[ -n "$WRK_PID" ]] && kill "$WRK_PID" 2>/dev/null
  if [[ -n "$MASTER" ]] && kill -0 "$MASTER" 2>/dev/null; then
    kill -TERM "$MASTER" 2>/dev/null
    sleep 1
    pkill -KILL -P "$MASTER" 2>/dev/null
    kill -KILL "$MASTER" 2>/dev/null
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start CONFIG REPORT TICK: starts a server, sets MASTER and PORT, waits until it answers.
start() {
  local config="$1" report="$2" tick="$3" args=() line="" i
  [[ "$config" == without ]] && args=(--no-workerlock)
  "$BIN" --workers "$WORKERS" --port 0 --lock "$TMP/bench.lock" --report "$report" --tick "$tick" \
    "${args[@]}" >"$TMP/server.out" 2>"$TMP/server.err" &
  MASTER=$!
  for ((i = 0; i < 200; i++)); do
    line="$(head -n 1 "$TMP/server.out" 2>/dev/null)"
    [[ "$line" == "listening on "* ]] && break
    kill -0 "$MASTER" 2>/dev/null || break
    sleep 0.05
  done
  [[ "$line" == "listening on "* ]] || { echo "http_bench: server did not start" >&2; cat "$TMP/server.err" >&2; exit 1; }
  PORT="${line##*:}"
  # Every worker up: the master logs one line per worker start; give them a moment to elect.
  for ((i = 0; i < 100; i++)); do
    curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/" && break
    sleep 0.05
  done
  sleep 0.3
}

stop() {
  local i
  kill -TERM "$MASTER" 2>/dev/null
  for ((i = 0; i < 400; i++)); do kill -0 "$MASTER" 2>/dev/null || break; sleep 0.05; done
  wait "$MASTER" 2>/dev/null
  MASTER=""
}

# wrk_rps PATH SECONDS: prints req/s (and appends the socket errors to $TMP/errors).
wrk_rps() {
  local out
  out="$("$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"${2}s" "http://127.0.0.1:$PORT$1" 2>&1)"
  grep -h 'Socket errors\|Non-2xx' <<<"$out" | sed "s|^|$1: |" >>"$TMP/errors"
  sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A RPS
echo "http_bench: $ROUNDS interleaved rounds x {with, without} x {$ENDPOINTS}, wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s,"
echo "            $WORKERS workers, tick ${TICK}s; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
for ((round = 1; round <= ROUNDS; round++)); do
  if ((round % 2)); then order=(with without); else order=(without with); fi
  for config in "${order[@]}"; do
    start "$config" "$TMP/report-$config.log" "$TICK"
    wrk_rps / 1 >/dev/null # warm-up
    results=""
    for endpoint in $ENDPOINTS; do
      rps="$(wrk_rps "$endpoint" "$DURATION")"
      RPS[$config,$endpoint]+="${rps:-0} "
      results+=" $endpoint=${rps:-0}"
    done
    stop
    printf '  round %d %-8s%s\n' "$round" "$config" "$results"
  done
done

echo
echo "## Requests per second, with and without workerlock (median of $ROUNDS rounds)"
echo
echo "| endpoint | with workerlock | without (--no-workerlock) | with / without | rounds with | rounds without |"
echo "|---|---:|---:|---:|---|---|"
for endpoint in $ENDPOINTS; do
  with="$(median <<<"${RPS[with,$endpoint]}")"
  without="$(median <<<"${RPS[without,$endpoint]}")"
  ratio="$(awk -v a="$with" -v b="$without" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')"
  printf '| GET %s | %.0f | %.0f | %s | %s | %s |\n' "$endpoint" "$with" "$without" "$ratio" \
    "$(sed 's/ *$//' <<<"${RPS[with,$endpoint]}")" "$(sed 's/ *$//' <<<"${RPS[without,$endpoint]}")"
done
echo
echo "Socket errors / non-2xx seen by wrk (none expected):"
if grep -qv 'connect 0, read 0, write 0, timeout 0' "$TMP/errors" 2>/dev/null; then
  grep -v 'connect 0, read 0, write 0, timeout 0' "$TMP/errors" | sort | uniq -c | sed 's/^/  /'
else
  echo "  none"
fi

# ---------------------------------------------------------------------------
echo
echo "## Failover gap after SIGKILL of the primary (tick ${FAILOVER_TICK}s, under wrk load)"
echo
REPORT="$TMP/failover.log"
start with "$REPORT" "$FAILOVER_TICK"
"$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$((2 + KILLS * 2))s" "http://127.0.0.1:$PORT/" >"$TMP/failover-wrk.out" 2>&1 &
WRK_PID=$!
sleep 1.5
STATUS_RE='"holder_pid":([0-9]+)'
for ((k = 1; k <= KILLS; k++)); do
  holder=""
  for ((i = 0; i < 20; i++)); do
    line="$(curl -sS --max-time 2 -H 'Connection: close' "http://127.0.0.1:$PORT/status" 2>/dev/null)"
    if [[ "$line" =~ $STATUS_RE ]] && [[ "$(ps -o ppid= -p "${BASH_REMATCH[1]}" | tr -d ' ')" == "$MASTER" ]]; then
      holder="${BASH_REMATCH[1]}"
      break
    fi
    sleep 0.1
  done
  [[ -n "$holder" ]] || { echo "http_bench: no primary found for kill $k" >&2; continue; }
  echo "$EPOCHREALTIME $holder" >>"$TMP/kills"
  kill -KILL "$holder"
  sleep 1.8
done
wait "$WRK_PID"
WRK_PID=""
stop
echo "| kill | killed primary | successor | ticks | gap (s) | later than one tick by (s) | ticks missed |"
echo "|---:|---:|---:|---|---:|---:|---:|"
awk -v tick="$FAILOVER_TICK" '
  FNR == NR { kt[++kills] = $1; victim[kills] = $2; next }
  { n++; e[n] = $3; p[n] = $2; num[n] = $1 }
  END {
    for (k = 1; k <= kills; k++) {
      for (i = 2; i <= n; i++) {
        if (p[i - 1] == victim[k] && p[i] != victim[k] && e[i] > kt[k]) {
          gap = e[i] - e[i - 1]
          missed = int(gap / tick + 1e-9) - 1 # whole tick slots that passed without a tick
          if (missed < 0) missed = 0
          late = gap - tick
          if (late < 0) late = 0
          printf "| %d | %s | %s | %d → %d | %.3f | %.3f | %d |\n", k, victim[k], p[i], num[i - 1], num[i], gap, late, missed
          gaps = gaps " " gap
          break
        }
      }
    }
    breaks = 0
    for (i = 2; i <= n; i++) if (num[i] != num[i - 1] + 1) breaks++
    printf "\n%d ticks in the report, %d breaks in the numbering; the ideal gap is one tick (%.1f s)\n", n, breaks, tick
  }' "$TMP/kills" "$REPORT"
sed -n 's/^ *\(Socket errors.*\)/wrk during the kills: \1 (connections of killed workers)/p' "$TMP/failover-wrk.out"

echo
echo "Command: ROUNDS=$ROUNDS DURATION=$DURATION THREADS=$THREADS CONNECTIONS=$CONNECTIONS WORKERS=$WORKERS TICK=$TICK" \
  "ENDPOINTS=\"$ENDPOINTS\" KILLS=$KILLS FAILOVER_TICK=$FAILOVER_TICK bash tests/bench/http_bench.sh $BIN"
echo "Each run: $WRK -t$THREADS -c$CONNECTIONS -d${DURATION}s http://127.0.0.1:PORT/ENDPOINT"
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
