#!/usr/bin/env bash
# workerlock: the pre-fork server demo (see README).
#
#   bash examples/prefork_server/demo.sh path/to/workerlock_prefork_server
#
# Starts 4 workers on a free loopback port (lock and report in a temporary directory,
# --tick 0.5), shows that exactly one worker is primary, SIGKILLs it, shows a standby
# promoted at once and the master's replacement worker joining as a secondary, then stops
# the server with SIGTERM and compares the report's ticks with the wall time.
# Finishes on its own in well under a minute; exits non-zero if anything is wrong.
set -uo pipefail

BIN="${1:?usage: demo.sh path/to/workerlock_prefork_server}"
TICK=0.5
WORKERS=4
command -v curl >/dev/null || { echo "demo: curl is required" >&2; exit 2; }
[[ -x "$BIN" ]] || { echo "demo: not an executable: $BIN" >&2; exit 2; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/workerlock-prefork-demo.XXXXXX")"
master=""
cleanup() {
  if [[ -n "$master" ]] && kill -0 "$master" 2>/dev/null; then
    kill -TERM "$master" 2>/dev/null
    sleep 1
    pkill -KILL -P "$master" 2>/dev/null
    kill -KILL "$master" 2>/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() {
  printf '\ndemo: FAILED: %s\n' "$*" >&2
  echo "--- server log ---" >&2
  cat "$tmp/server.log" >&2
  exit 1
}
elapsed_since() { awk -v a="$EPOCHREALTIME" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }

STATUS_RE='"pid":([0-9]+),"role":"([a-z]+)","holder_pid":([0-9]+|null),"ticks":([0-9]+)'
declare -A ROLE HOLDER TICKS

# survey: asks /status (each request on a new connection, so the workers' accept race
# spreads them) until every worker answered or 500 requests went out (on a loaded machine the
# race can pass one worker over many times in a row); fills ROLE/HOLDER/TICKS.
survey() {
  local i line
  ROLE=() HOLDER=() TICKS=()
  for ((i = 0; i < 500 && ${#ROLE[@]} < WORKERS; i++)); do
    line="$(curl -sS --max-time 2 -H 'Connection: close' "http://127.0.0.1:$port/status" 2>/dev/null)" || continue
    [[ "$line" =~ $STATUS_RE ]] || continue
    ROLE[${BASH_REMATCH[1]}]="${BASH_REMATCH[2]}"
    HOLDER[${BASH_REMATCH[1]}]="${BASH_REMATCH[3]}"
    TICKS[${BASH_REMATCH[1]}]="${BASH_REMATCH[4]}"
  done
  printf '    %-8s %-10s %-11s %s\n' pid role holder_pid ticks
  for pid in $(printf '%s\n' "${!ROLE[@]}" | sort -n); do
    printf '    %-8s %-10s %-11s %s\n' "$pid" "${ROLE[$pid]}" "${HOLDER[$pid]}" "${TICKS[$pid]}"
  done
  ((${#ROLE[@]} == WORKERS)) || echo "    (only ${#ROLE[@]} of $WORKERS workers answered in 500 requests)"
}

# the_primary: prints the one primary of the last survey; fails on none, two, or disagreement.
the_primary() {
  local pid primaries=() holders
  for pid in "${!ROLE[@]}"; do [[ "${ROLE[$pid]}" == primary ]] && primaries+=("$pid"); done
  holders="$(printf '%s\n' "${HOLDER[@]}" | sort -u | tr '\n' ' ')"
  ((${#primaries[@]} == 1)) || { echo "expected one primary, saw ${#primaries[@]}: ${primaries[*]:-none}"; return 1; }
  [[ "$holders" == "${primaries[0]} " ]] || { echo "workers name holders [$holders], primary is ${primaries[0]}"; return 1; }
  echo "${primaries[0]}"
}

step "Start $WORKERS workers on a free loopback port, tick $TICK s"
echo "+ $BIN --workers $WORKERS --port 0 --lock $tmp/demo.lock --report $tmp/report.log --tick $TICK"
"$BIN" --workers "$WORKERS" --port 0 --lock "$tmp/demo.lock" --report "$tmp/report.log" --tick "$TICK" \
  >"$tmp/stdout" 2>"$tmp/server.log" &
master=$!
t_start="$EPOCHREALTIME"
for _ in $(seq 100); do
  grep -q '^listening on' "$tmp/stdout" 2>/dev/null && break
  kill -0 "$master" 2>/dev/null || die "the server exited at startup"
  sleep 0.05
done
first_line="$(head -n 1 "$tmp/stdout")"
[[ "$first_line" == "listening on "* ]] || die "no 'listening on' line"
port="${first_line##*:}"
echo "    $first_line (master pid $master)"
sleep 1.5 # let a few ticks happen

step "GET /status from every worker"
survey
primary="$(the_primary)" || die "$primary"
original=("${!ROLE[@]}")
echo "    exactly one primary: pid $primary; every worker names it as the holder"

step "SIGKILL the primary (pid $primary): a standby takes over at once"
t_kill="$EPOCHREALTIME"
kill -KILL "$primary"
new=""
for _ in $(seq 250); do
  line="$(curl -sS --max-time 2 -H 'Connection: close' "http://127.0.0.1:$port/status" 2>/dev/null)"
  holder=""
  [[ "$line" =~ $STATUS_RE ]] && holder="${BASH_REMATCH[3]}"
  if [[ "$holder" =~ ^[0-9]+$ && "$holder" != "$primary" ]]; then
    new="$holder"
    break
  fi
  sleep 0.02
done
[[ -n "$new" ]] || die "no standby was promoted within 5 s"
echo "    /status names the new holder, pid $new, $(elapsed_since "$t_kill") s after the kill"
grep -E "role=primary|killed by signal|started \(generation" "$tmp/server.log" | tail -n 3 | sed 's/^/    log: /'

step "The master replaces the dead worker; the newcomer joins as a secondary"
newcomer=""
for _ in $(seq 100); do
  for pid in $(sed -n 's/.*worker pid=\([0-9]*\) started.*/\1/p' "$tmp/server.log"); do
    [[ " ${original[*]} " == *" $pid "* ]] || newcomer="$pid"
  done
  [[ -n "$newcomer" ]] && break
  sleep 0.05
done
[[ -n "$newcomer" ]] || die "the master did not respawn the killed worker"
sleep 0.5
survey
[[ "${ROLE[$newcomer]:-}" == secondary || -z "${ROLE[$newcomer]:-}" ]] ||
  die "the replacement worker $newcomer is ${ROLE[$newcomer]}"
[[ -n "${ROLE[$newcomer]:-}" ]] && echo "    replacement worker pid $newcomer answers as secondary"
primary2="$(the_primary)" || die "$primary2"
[[ "$primary2" == "$new" ]] || die "the primary is $primary2, not the promoted $new"
echo "    still exactly one primary: pid $primary2"
sleep 1

step "SIGTERM the master: workers finish their requests, the master exits 0"
kill -TERM "$master"
for _ in $(seq 300); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
kill -0 "$master" 2>/dev/null && die "the master did not exit within 30 s"
wait "$master"
rc=$?
t_stop="$EPOCHREALTIME"
master=""
tail -n 2 "$tmp/server.log" | sed 's/^/    log: /'
[[ $rc -eq 0 ]] || die "the master exited with status $rc"

step "The report: one line per tick, numbered across the failover"
echo "    format: TICK PID EPOCH UTC; first and last lines:"
head -n 2 "$tmp/report.log" | sed 's/^/    /'
echo "    ..."
tail -n 2 "$tmp/report.log" | sed 's/^/    /'
awk -v tick="$TICK" -v wall="$(awk -v a="$t_stop" -v b="$t_start" 'BEGIN { print a - b }')" '
  NR > 1 && $1 != prev + 1 { breaks++ }
  NR > 1 && $3 - t > maxgap { maxgap = $3 - t }
  NR > 1 && $2 != pid { handoffs = handoffs sprintf("    handoff: tick %d by pid %s, tick %d by pid %s %.3f s later\n", prev, pid, $1, $2, $3 - t) }
  { prev = $1; t = $3; pid = $2; per[$2]++ }
  END {
    printf "    %d ticks in %.1f s of wall time (%.1f expected at one per %.1f s); max gap %.3f s\n",
      NR, wall, wall / tick, tick, maxgap
    for (p in per) printf "    pid %-8s ran %d ticks\n", p, per[p]
    printf "%s", handoffs
    if (breaks) { printf "    %d breaks in the tick numbering!\n", breaks; exit 1 }
    print "    numbering: consecutive, no tick run twice"
  }' "$tmp/report.log" || die "the report's tick numbering is broken"
echo
echo "demo: OK"
