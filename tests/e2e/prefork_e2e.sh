#!/usr/bin/env bash
# End-to-end test of examples/prefork_server (workerlock_prefork_server).
#
#   bash tests/e2e/prefork_e2e.sh path/to/workerlock_prefork_server
#
# Loopback only, everything in a temporary directory; every process it starts is stopped
# on exit. Needs curl and wrk. Phases:
#   1. failover under load: 4 workers, --tick 0.2, wrk for LOAD_SECONDS while the current
#      primary is SIGKILLed KILLS times and the master gets one SIGHUP; /status is sampled
#      all along. Asserts, from the report file and the samples:
#        - tick numbers go up by exactly 1 per line: no tick run twice or by two workers;
#        - no gap between consecutive ticks' wall times exceeds TICK + FAILOVER_BOUND;
#        - at every sample all workers name one holder pid, and at most one worker (the
#          holder) says primary (a disagreeing sample is retried once after 200 ms);
#        - requests keep being served: no non-2xx answers, socket errors only on the
#          connections of killed workers (at most KILLS x connections);
#        - SIGTERM ends the master with status 0 and no worker survives it.
#   2. --no-coordination writes about N x the ticks of a coordinated run of the same length
#      (asserted: >= 0.5 x N x).
#   3. a second server on the same lock (another port) stays secondary until the first exits,
#      then takes over and continues the numbering in the shared report.
#   4. bad options, and an unusable lock path, exit non-zero with a message before forking.
# Knobs (environment): WRK, LOAD_SECONDS (default 18), KILLS (default 5), TICK (0.2),
# FAILOVER_BOUND (3.0 s), CONNECTIONS (16), PHASES ("1 2 3 4"), KEEP_TMP (keep the logs).
# Every check counts. The wall-clock bounds (gaps, rates) are wide enough to hold on a loaded
# 2-core machine under ASan: they prove that the work moved and kept going, not how fast;
# failover speed is measured by tests/bench (run-bench.sh failover).
set -uo pipefail

BIN="${1:?usage: prefork_e2e.sh path/to/workerlock_prefork_server}"
WRK="${WRK:-wrk}"
WORKERS=4
TICK="${TICK:-0.2}"
FAILOVER_BOUND="${FAILOVER_BOUND:-3.0}"
LOAD_SECONDS="${LOAD_SECONDS:-18}"
KILLS="${KILLS:-5}"
CONNECTIONS="${CONNECTIONS:-16}"
PHASES="${PHASES:-1 2 3 4}"
phase() { [[ " $PHASES " == *" $1 "* ]]; }

[[ -x "$BIN" ]] || { echo "prefork_e2e: not an executable: $BIN" >&2; exit 2; }
command -v curl >/dev/null || { echo "prefork_e2e: curl is required" >&2; exit 2; }
command -v "$WRK" >/dev/null || { echo "prefork_e2e: wrk is required (apt-get install wrk)" >&2; exit 2; }
((KILLS >= 5)) || { echo "prefork_e2e: KILLS must be >= 5" >&2; exit 2; }
((LOAD_SECONDS >= 16)) || { echo "prefork_e2e: LOAD_SECONDS must be >= 16" >&2; exit 2; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/prefork-e2e.XXXXXX")"
MASTERS=()   # every master this script started
WRK_PID=""
FAILURES=0

cleanup() {
  local pid deadline
  [[ -n "$WRK_PID" ]] && kill "$WRK_PID" 2>/dev/null
  for pid in "${MASTERS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  deadline=$((SECONDS + 5))
  for pid in "${MASTERS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      # Its workers first (children of this master only), then the master itself.
      pkill -KILL -P "$pid" 2>/dev/null
      kill -KILL "$pid" 2>/dev/null
    fi
  done
  if [[ -n "${KEEP_TMP:-}" ]]; then echo "prefork_e2e: kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '\n== %s\n' "$*"; }
pass() { printf '  PASS  %s\n' "$*"; }
fail() {
  printf '  FAIL  %s\n' "$*"
  FAILURES=$((FAILURES + 1))
}
check() { # check "description" command...
  local what="$1"
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }  # float a <= b

# start_server NAME ARGS...: starts a master; sets SERVER_PID and SERVER_PORT.
start_server() {
  local name="$1" line="" deadline
  shift
  "$BIN" --port 0 "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
  SERVER_PID=$!
  MASTERS+=("$SERVER_PID")
  deadline=$((SECONDS + 15))
  while ((SECONDS < deadline)); do
    line="$(head -n 1 "$TMP/$name.out" 2>/dev/null)"
    [[ "$line" == "listening on 127.0.0.1:"* ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  if [[ "$line" != "listening on 127.0.0.1:"* ]]; then
    echo "prefork_e2e: server '$name' did not start; its stderr:" >&2
    cat "$TMP/$name.err" >&2
    exit 1
  fi
  SERVER_PORT="${line##*:}"
}

# stop_server PID [TIMEOUT]: SIGTERM, wait; sets STOP_RC to the exit status (or "timeout").
# Not to be called in $(...): only this shell, the parent, can collect the status.
stop_server() {
  local pid="$1" timeout="${2:-40}" deadline
  kill -TERM "$pid" 2>/dev/null
  deadline=$((SECONDS + timeout))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    STOP_RC=timeout
    return
  fi
  wait "$pid" 2>/dev/null
  STOP_RC=$?
}

# status_burst PORT COUNT: COUNT /status answers, each on a new connection (so the workers'
# accept race spreads them), one JSON object per line. curl goes on after a failed URL.
status_burst() {
  local urls=() i
  for ((i = 0; i < $2; i++)); do urls+=("http://127.0.0.1:$1/status"); done
  curl -sS --max-time 5 -H 'Connection: close' "${urls[@]}" 2>/dev/null
}

STATUS_RE='"pid":([0-9]+),"role":"([a-z]+)","holder_pid":([0-9]+|null),"ticks":([0-9]+)'

# sample PORT: asks /status until every worker answered (at most 3 bursts of 12). Sets
# S_PIDS (distinct answering pids), S_HOLDERS (distinct holder_pid values), S_PRIMARIES
# (distinct pids answering role=primary), S_ANSWERS, S_TICKS_OF_SECONDARIES.
sample() {
  local port="$1" line
  local -A seen=() holders=() primaries=()
  S_ANSWERS=0
  S_TICKS_OF_SECONDARIES=0
  for _ in 1 2 3; do
    while IFS= read -r line; do
      [[ "$line" =~ $STATUS_RE ]] || continue
      seen[${BASH_REMATCH[1]}]=1
      holders[${BASH_REMATCH[3]}]=1
      if [[ "${BASH_REMATCH[2]}" == primary ]]; then
        primaries[${BASH_REMATCH[1]}]=1
      else
        S_TICKS_OF_SECONDARIES=$((S_TICKS_OF_SECONDARIES + BASH_REMATCH[4]))
      fi
      S_ANSWERS=$((S_ANSWERS + 1))
    done < <(status_burst "$port" 12)
    ((${#seen[@]} >= WORKERS)) && break
  done
  S_PIDS="${!seen[*]}"
  S_HOLDERS="${!holders[*]}"
  S_PRIMARIES="${!primaries[*]}"
}

# One holder, not null, and at most one primary, which is the holder.
sample_agrees() {
  [[ "$S_ANSWERS" -gt 0 && "$S_HOLDERS" =~ ^[0-9]+$ && "$S_HOLDERS" != 0 ]] || return 1
  [[ -z "$S_PRIMARIES" || "$S_PRIMARIES" == "$S_HOLDERS" ]]
}

SAMPLES=0 RETRIED=0 DISAGREED=0 EMPTY=0 SEEN_TOTAL=0
# checked_sample PORT: one sample with one retry after 200 ms; sets HOLDER ("" if none).
checked_sample() {
  sample "$1"
  SAMPLES=$((SAMPLES + 1))
  if ! sample_agrees; then
    RETRIED=$((RETRIED + 1))
    sleep 0.2
    sample "$1"
    if ! sample_agrees; then
      if ((S_ANSWERS == 0)); then
        EMPTY=$((EMPTY + 1))
      else
        DISAGREED=$((DISAGREED + 1))
        echo "  disagreeing sample: pids [$S_PIDS] holders [$S_HOLDERS] primaries [$S_PRIMARIES]"
      fi
      HOLDER=""
      return 1
    fi
  fi
  SEEN_TOTAL=$((SEEN_TOTAL + $(wc -w <<<"$S_PIDS")))
  HOLDER="$S_HOLDERS"
}

is_child_of() { # is_child_of PID MASTER
  [[ "$(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ')" == "$2" ]]
}

# analyse_report FILE: tick sequence, gaps and handoffs. Prints a summary and sets
# R_LINES R_BAD R_BREAKS R_DUPS R_MAXGAP R_HANDOFFS R_MAXHANDOFF R_PIDS R_SPAN.
analyse_report() {
  local out
  out="$(awk '
    NF != 4 || $1 !~ /^[0-9]+$/ { bad++; next }
    {
      if (n > 0) {
        if ($1 != prev + 1) { breaks++; if (breaks <= 5) printf "  tick break: %s -> %s\n", prev, $1 > "/dev/stderr" }
        gap = $3 - t
        if (gap > maxgap) maxgap = gap
        if ($2 != pid) {
          handoffs++; if (gap > maxho) maxho = gap
          # A pid that ticks again after another took over: two workers ran the scheduler.
          if ($2 in per) { returns++; if (returns <= 5) printf "  pid %s ticks again at tick %s\n", $2, $1 > "/dev/stderr" }
        }
      } else { first = $3 }
      if (seen[$1]++) dups++
      if (!($2 in per)) npids++
      per[$2]++
      prev = $1; t = $3; pid = $2; n++
    }
    END { printf "%d %d %d %d %.3f %d %.3f %d %.3f %d\n", n, bad, breaks, dups, maxgap, handoffs, maxho, npids, t - first, returns }
  ' "$1")"
  read -r R_LINES R_BAD R_BREAKS R_DUPS R_MAXGAP R_HANDOFFS R_MAXHANDOFF R_PIDS R_SPAN R_RETURNS <<<"$out"
}

ticks_per_pid() { awk '{ n[$2]++ } END { for (p in n) printf "%s:%d ", p, n[p]; print "" }' "$1"; }

# ============================================================================
limit="$(awk -v a="$TICK" -v b="$FAILOVER_BOUND" 'BEGIN { print a + b }')"
if phase 1; then
log "1. failover under load: $WORKERS workers, tick $TICK s, wrk ${LOAD_SECONDS}s, $KILLS SIGKILLs of the primary, 1 SIGHUP"
REPORT1="$TMP/report1.log"
start_server main --workers "$WORKERS" --lock "$TMP/main.lock" --report "$REPORT1" --tick "$TICK"
MAIN="$SERVER_PID" PORT="$SERVER_PORT"
echo "  master pid=$MAIN port=$PORT"
T0="$EPOCHREALTIME"

# Wait for the first election (not counted as samples: the workers may still be starting).
HOLDER=""
for _ in $(seq 100); do
  sample "$PORT"
  sample_agrees && HOLDER="$S_HOLDERS" && break
  sleep 0.1
done
check "a primary was elected at startup (holder ${HOLDER:-none})" test -n "$HOLDER"

"$WRK" -t2 -c"$CONNECTIONS" -d"${LOAD_SECONDS}s" --timeout 5s "http://127.0.0.1:$PORT/" >"$TMP/wrk.out" 2>&1 &
WRK_PID=$!

KILLED=()
KILL_TIMES=()
KILL_DONE=()
FAILOVER_FAILS=0
# Kill k is due at wrk's start + k * interval, on the clock rather than after the previous
# kill's sampling and failover, so a slow machine (or a sanitizer build) cannot push the
# last kill past the end of the load. The last one is due 4 s before wrk stops.
interval_us=$(((LOAD_SECONDS - 4) * 1000000 / KILLS))
((interval_us < 2000000)) && interval_us=2000000
wrk_start_us=${EPOCHREALTIME/[.,]/}
for ((k = 1; k <= KILLS; k++)); do
  # Sample while waiting for the next kill.
  kill_due_us=$((wrk_start_us + k * interval_us))
  while ((${EPOCHREALTIME/[.,]/} + 300000 < kill_due_us)); do
    checked_sample "$PORT"
    sleep 0.3
  done
  while ((${EPOCHREALTIME/[.,]/} < kill_due_us)); do sleep 0.02; done
  if ((k == KILLS / 2)); then
    echo "  SIGHUP to the master (rolling replacement of all workers)"
    kill -HUP "$MAIN"
  fi
  # Find the current primary and make sure it is one of our workers.
  victim=""
  for _ in 1 2 3 4 5; do
    if checked_sample "$PORT" && is_child_of "$HOLDER" "$MAIN"; then
      victim="$HOLDER"
      break
    fi
    sleep 0.2
  done
  if [[ -z "$victim" ]]; then
    fail "kill $k: no primary among the master's workers"
    continue
  fi
  t_kill="$EPOCHREALTIME" # read directly: $(...) would fork, and delay the kill under load
  kill -KILL "$victim"
  KILLED+=("$victim")
  KILL_TIMES+=("$t_kill")
  KILL_DONE+=("$EPOCHREALTIME") # once kill(2) returned, the victim runs no more code
  # Wait for another worker to hold the lock.
  new=""
  deadline_us=$((${t_kill/[.,]/} + 5000000)) # $EPOCHREALTIME without the dot: microseconds
  while ((${EPOCHREALTIME/[.,]/} < deadline_us)); do
    line="$(curl -sS --max-time 2 -H 'Connection: close' "http://127.0.0.1:$PORT/status" 2>/dev/null)"
    if [[ "$line" =~ $STATUS_RE ]] && [[ "${BASH_REMATCH[3]}" != null && "${BASH_REMATCH[3]}" != "$victim" ]]; then
      new="${BASH_REMATCH[3]}"
      break
    fi
    sleep 0.02
  done
  if [[ -n "$new" ]]; then
    printf '  kill %d: SIGKILL primary %s -> /status names holder %s after %d ms (curl polling, under load)\n' \
      "$k" "$victim" "$new" $(((${EPOCHREALTIME/[.,]/} - ${t_kill/[.,]/}) / 1000))
  else
    FAILOVER_FAILS=$((FAILOVER_FAILS + 1))
    echo "  kill $k: SIGKILL primary $victim -> no new holder within 5 s"
  fi
done
check "every SIGKILLed primary was replaced by another holder within 5 s ($KILLS kills)" test "$FAILOVER_FAILS" -eq 0
# The kills must land under load, or "requests kept being served" would prove nothing.
wrk_alive=0
kill -0 "$WRK_PID" 2>/dev/null && wrk_alive=1
check "wrk was still running after the last kill (load lasted through every failover)" test "$wrk_alive" -eq 1

# Keep sampling until wrk is done.
while kill -0 "$WRK_PID" 2>/dev/null; do
  checked_sample "$PORT"
  sleep 0.3
done
wait "$WRK_PID"
WRK_RC=$?
WRK_PID=""
# The last respawned worker may still be starting (slow under a sanitizer): sample until all
# $WORKERS answer, for up to 10 s.
for _ in $(seq 40); do
  checked_sample "$PORT"
  (($(wc -w <<<"$S_PIDS") >= WORKERS)) && break
  sleep 0.25
done

stop_server "$MAIN"
T1="$EPOCHREALTIME"
check "SIGTERM: master exited with status 0 (got $STOP_RC)" test "$STOP_RC" = 0
survivors=0
for pid in $(sed -n 's/.*worker pid=\([0-9]*\) started.*/\1/p' "$TMP/main.err"); do
  kill -0 "$pid" 2>/dev/null && survivors=$((survivors + 1))
done
spawned="$(grep -c 'worker pid=[0-9]* started' "$TMP/main.err")"
check "no worker outlived the master ($spawned workers were started in all)" test "$survivors" -eq 0
check "SIGHUP replaced every worker (\"reload complete\" in the master log)" grep -q 'reload complete' "$TMP/main.err"
# A kill can hit the old primary while SIGHUP replaces it ("replaced by" instead of
# "respawning"), even after the master told it to stop: then it may have exited 0 on its
# own before the SIGKILL landed. Either way the master must have logged that pid's end,
# and the samples show N workers again.
deaths=0 unnoticed=""
for pid in "${KILLED[@]}"; do
  if grep -q "worker pid=$pid .*killed by signal 9" "$TMP/main.err" ||
    { grep -q "stopping worker pid=$pid " "$TMP/main.err" &&
      grep -q "worker pid=$pid .*exit code 0" "$TMP/main.err"; }; then
    deaths=$((deaths + 1))
  else
    unnoticed+=" $pid"
  fi
done
check "the master logged the end of every SIGKILLed worker ($deaths of ${#KILLED[@]}${unnoticed:+; not:$unnoticed}) and kept $WORKERS workers" \
  test "$deaths" -eq "${#KILLED[@]}" -a "$(wc -w <<<"$S_PIDS")" -eq "$WORKERS"

echo "  /status samples: $SAMPLES, retried after 200 ms: $RETRIED, still disagreeing: $DISAGREED, unanswered: $EMPTY," \
  "workers seen per sample: $(awk -v a="$SEEN_TOTAL" -v b="$SAMPLES" 'BEGIN { printf "%.1f", b ? a / b : 0 }')"
check "all workers agreed on one holder (and one primary) at every sample" test "$DISAGREED" -eq 0
check "every /status sample was answered" test "$EMPTY" -eq 0

# wrk
requests="$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$TMP/wrk.out")"
rps="$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$TMP/wrk.out")"
non2xx="$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$TMP/wrk.out")"
read -r e_connect e_read e_write e_timeout < <(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1 \2 \3 \4/p' "$TMP/wrk.out")
e_connect=${e_connect:-0} e_read=${e_read:-0} e_write=${e_write:-0} e_timeout=${e_timeout:-0} non2xx=${non2xx:-0}
socket_errors=$((e_connect + e_read + e_write + e_timeout))
allowed=$((${#KILLED[@]} * CONNECTIONS))
echo "  wrk: ${requests:-0} requests, ${rps:-0} req/s; socket errors: connect $e_connect, read $e_read, write $e_write, timeout $e_timeout; non-2xx: $non2xx"
check "wrk ran (exit status $WRK_RC) and requests kept being served (${requests:-0} > 1000)" test "$WRK_RC" -eq 0 -a "${requests:-0}" -gt 1000
check "no non-2xx responses" test "$non2xx" -eq 0
check "socket errors ($socket_errors) only on killed workers' connections (<= ${#KILLED[@]} kills x $CONNECTIONS = $allowed)" \
  test "$socket_errors" -le "$allowed"

# The report.
analyse_report "$REPORT1"
elapsed="$(awk -v a="$T1" -v b="$T0" 'BEGIN { printf "%.1f", a - b }')"
echo "  report: $R_LINES ticks over ${elapsed}s of server life (expected ~$(awk -v e="$elapsed" -v t="$TICK" 'BEGIN { printf "%d", e / t }')), $R_PIDS workers ran ticks, $R_HANDOFFS handoffs"
echo "          max gap between ticks ${R_MAXGAP}s, max gap at a handoff ${R_MAXHANDOFF}s (bound: tick + $FAILOVER_BOUND = ${limit}s)"
echo "          ticks per worker pid: $(ticks_per_pid "$REPORT1")"
check "every report line is well formed" test "$R_BAD" -eq 0
check "tick numbers strictly increase by 1 (no tick written twice or by two workers)" test "$R_BREAKS" -eq 0 -a "$R_DUPS" -eq 0
check "no gap between consecutive ticks exceeds ${limit}s (max ${R_MAXGAP}s)" le "$R_MAXGAP" "$limit"
check "the work moved at every kill ($R_HANDOFFS handoffs >= ${#KILLED[@]})" test "$R_HANDOFFS" -ge "${#KILLED[@]}"
# Killed and SIGHUP-replaced workers never come back, so with one primary at a time each
# pid's ticks form one unbroken run; two primaries would interleave.
check "each worker's ticks form one unbroken run ($R_RETURNS returns of an earlier pid)" test "$R_RETURNS" -eq 0
# From each SIGKILL to the first tick by another worker. The victim may finish a tick it
# timestamped before kill(2) returned, but none timestamped after (10 ms clock slack).
worst_delay=0
DELAYS=""
for i in "${!KILLED[@]}"; do
  read -r delay late < <(awk -v t="${KILL_TIMES[$i]}" -v done="${KILL_DONE[$i]}" -v victim="${KILLED[$i]}" '
    $2 == victim && $3 > done + 0.01 { late++ }
    $2 != victim && $3 > t && delay == "" { delay = sprintf("%.3f", $3 - t) }
    END { print (delay == "" ? "none" : delay), late + 0 }' "$REPORT1")
  if [[ "$delay" == none ]]; then
    fail "no tick by another worker after kill $((i + 1))"
    continue
  fi
  [[ "$late" -eq 0 ]] || fail "the SIGKILLed worker ${KILLED[$i]} wrote $late ticks after its kill"
  le "$delay" "$worst_delay" || worst_delay="$delay"
  DELAYS+="${delay}s "
done
echo "          SIGKILL -> first tick by another worker: ${DELAYS:-}"
check "after every SIGKILL the next tick came within tick + $FAILOVER_BOUND s (worst ${worst_delay}s)" le "$worst_delay" "$limit"
check "ticks kept their rate ($R_LINES >= 50% of ${R_SPAN}s / ${TICK}s)" \
  awk -v n="$R_LINES" -v e="$R_SPAN" -v t="$TICK" 'BEGIN { exit !(n >= 0.5 * e / t) }'
check "no more ticks than one scheduler writes ($R_LINES <= ${R_SPAN}s / ${TICK}s + 2)" \
  awk -v n="$R_LINES" -v e="$R_SPAN" -v t="$TICK" 'BEGIN { exit !(n <= e / t + 2) }'

fi # phase 1

# ============================================================================
if phase 2; then
SHORT=6
log "2. coordinated vs --no-coordination, ${SHORT}s each, no load"
declare -A RATE
for mode in coordinated uncoordinated; do
  extra=()
  [[ $mode == uncoordinated ]] && extra=(--no-coordination)
  start_server "$mode" --workers "$WORKERS" --lock "$TMP/$mode.lock" --report "$TMP/$mode.log" --tick "$TICK" "${extra[@]}"
  # Measure from the moment all workers answer (each starts its scheduler, or joins the
  # election, before it serves), so slow starts (sanitizers) do not skew the rates.
  for _ in $(seq 100); do
    sample "$SERVER_PORT"
    (($(wc -w <<<"$S_PIDS") >= WORKERS)) && break
    sleep 0.1
  done
  lines_a="$(wc -l <"$TMP/$mode.log")"
  t_a="$EPOCHREALTIME"
  sleep "$SHORT"
  lines_b="$(wc -l <"$TMP/$mode.log")"
  t_b="$EPOCHREALTIME"
  stop_server "$SERVER_PID"
  [[ "$STOP_RC" == 0 ]] || fail "$mode run: master exit status $STOP_RC"
  lines=$((lines_b - lines_a))
  RATE[$mode]="$(awk -v n="$lines" -v a="$t_a" -v b="$t_b" 'BEGIN { printf "%.2f", n / (b - a) }')"
  dups="$(awk '{ print $1 }' "$TMP/$mode.log" | sort -n | uniq -d | wc -l)"
  echo "  $mode: $lines ticks in ${SHORT}s (${RATE[$mode]}/s, ideal $(awk -v t="$TICK" 'BEGIN { print 1 / t }')/s per scheduler), repeated tick numbers: $dups"
  echo "    ticks per worker pid: $(ticks_per_pid "$TMP/$mode.log")"
done
ratio="$(awk -v u="${RATE[uncoordinated]}" -v c="${RATE[coordinated]}" 'BEGIN { printf "%.2f", (c > 0 ? u / c : 0) }')"
check "--no-coordination runs the job ~${WORKERS}x as often (ratio $ratio >= 0.5 x $WORKERS)" \
  awk -v r="$ratio" -v n="$WORKERS" 'BEGIN { exit !(r >= 0.5 * n) }'

fi # phase 2

# ============================================================================
if phase 3; then
log "3. a second server on the same lock stays secondary until the first exits"
REPORT3="$TMP/shared-report.log"
start_server first --workers 3 --lock "$TMP/shared.lock" --report "$REPORT3" --tick "$TICK"
FIRST="$SERVER_PID" FIRST_PORT="$SERVER_PORT"
FIRST_HOLDER=""
for _ in $(seq 100); do
  sample "$FIRST_PORT"
  sample_agrees && FIRST_HOLDER="$S_HOLDERS" && break
  sleep 0.1
done
check "first server elected a primary ($FIRST_HOLDER)" is_child_of "$FIRST_HOLDER" "$FIRST"
start_server second --workers 2 --lock "$TMP/shared.lock" --report "$REPORT3" --tick "$TICK"
SECOND="$SERVER_PID" SECOND_PORT="$SERVER_PORT"
sleep 0.5
second_ok=1
for _ in $(seq 6); do
  sample "$SECOND_PORT"
  if [[ -n "$S_PRIMARIES" || "$S_HOLDERS" != "$FIRST_HOLDER" || "$S_TICKS_OF_SECONDARIES" != 0 ]]; then
    second_ok=0
    echo "  second server: pids [$S_PIDS] primaries [$S_PRIMARIES] holders [$S_HOLDERS] ticks $S_TICKS_OF_SECONDARIES"
  fi
  sleep 0.3
done
check "every worker of the second server is secondary, runs no tick, and names the first's primary" test "$second_ok" -eq 1
check "the second server's log shows no promotion" bash -c "! grep -q 'role=primary' '$TMP/second.err'"
stop_server "$FIRST"
check "first server exited with status 0 (got $STOP_RC)" test "$STOP_RC" = 0
took_over=""
for _ in $(seq 100); do
  sample "$SECOND_PORT"
  if [[ "$S_HOLDERS" =~ ^[0-9]+$ ]] && is_child_of "$S_HOLDERS" "$SECOND"; then
    took_over="$S_HOLDERS"
    break
  fi
  sleep 0.05
done
check "then a worker of the second server took over (${took_over:-none})" test -n "$took_over"
sleep 1
stop_server "$SECOND"
check "second server exited with status 0 (got $STOP_RC)" test "$STOP_RC" = 0
analyse_report "$REPORT3"
echo "  shared report: $R_LINES ticks, $R_HANDOFFS handoffs, max gap ${R_MAXGAP}s; ticks per pid: $(ticks_per_pid "$REPORT3")"
check "the numbering continued across the two servers (no break, no repeat)" test "$R_BREAKS" -eq 0 -a "$R_DUPS" -eq 0 -a "$R_BAD" -eq 0
check "the second server's ticks follow the first's without a gap over ${limit}s (max ${R_MAXGAP}s)" le "$R_MAXGAP" "$limit"

fi # phase 3

# ============================================================================
if phase 4; then
log "4. bad options and unusable lock paths exit non-zero before forking"
# expect_refusal "description" ARGS...: non-zero status, a message, no listening line (it is
# printed after every check and before the first fork), and no worker.
RUNNER=()
expect_refusal() {
  local what="$1" rc
  shift
  timeout 10 "${RUNNER[@]}" "$BIN" "$@" >"$TMP/refusal.out" 2>"$TMP/refusal.err"
  rc=$?
  if [[ $rc -ne 0 && $rc -ne 124 && -s "$TMP/refusal.err" && ! -s "$TMP/refusal.out" ]] &&
    ! grep -q 'worker pid=' "$TMP/refusal.err"; then
    pass "$what -> status $rc: $(head -n 1 "$TMP/refusal.err")"
  else
    fail "$what -> status $rc, stdout [$(head -c 200 "$TMP/refusal.out")], stderr [$(head -c 300 "$TMP/refusal.err")]"
  fi
}
common=(--port 0 --report "$TMP/refusal-report.log")
expect_refusal "--workers 0" --workers 0 "${common[@]}"
expect_refusal "--workers many" --workers many "${common[@]}"
expect_refusal "--tick 0" --tick 0 "${common[@]}"
expect_refusal "--tick abc" --tick abc "${common[@]}"
expect_refusal "--port 65536" --port 65536
expect_refusal "--lock without a value" "${common[@]}" --lock
expect_refusal "unknown option --frobnicate" --frobnicate "${common[@]}"
expect_refusal "lock in a missing directory" --lock "$TMP/no-such-dir/x.lock" "${common[@]}"
expect_refusal "lock under /proc" --lock /proc/workerlock-e2e-forbidden.lock "${common[@]}"
expect_refusal "lock path is a directory" --lock "$TMP" "${common[@]}"
mkdir -p "$TMP/readonly"
chmod 0555 "$TMP/readonly"
if [[ $(id -u) -ne 0 ]]; then
  expect_refusal "lock in a directory without write permission" --lock "$TMP/readonly/x.lock" "${common[@]}"
elif command -v setpriv >/dev/null && setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$BIN" 2>/dev/null; then
  chmod 0755 "$TMP" # let the unprivileged user reach $TMP/readonly (still not write it)
  RUNNER=(setpriv --reuid=65534 --regid=65534 --clear-groups)
  expect_refusal "lock in a directory without write permission (as uid 65534)" \
    --lock "$TMP/readonly/x.lock" --port 0 --report /dev/null
  RUNNER=()
  chmod 0700 "$TMP"
else
  echo "  skip  lock in a directory without write permission (root, and uid 65534 cannot run $BIN)"
fi
timeout 10 "$BIN" --help >"$TMP/help.out" 2>&1
help_rc=$?
check "--help exits 0 (got $help_rc) and documents the report format" \
  grep -q 'TICK PID EPOCH UTC' "$TMP/help.out"
[[ $help_rc -eq 0 ]] || fail "--help exit status $help_rc"
fi # phase 4

echo
if ((FAILURES > 0)); then
  echo "prefork_e2e: FAILED ($FAILURES checks)"
  exit 1
fi
echo "prefork_e2e: OK"
