#!/usr/bin/env bash
# workerlock: who takes over from a SIGKILLed primary in examples/prefork_server, a standby
# or the replacement worker the master forks, with and without the master's respawn delay.
#
#   bash tests/bench/respawn_race.sh path/to/workerlock_prefork_server
#
# For each --respawn-delay in DELAYS, one server (WORKERS workers) has its primary SIGKILLed
# KILLS times; 0.4 s after each kill the holder record names the new primary, which is either
# one of the workers that were alive before the kill (a standby) or the replacement.
# Knobs (environment): KILLS=30 WORKERS=4 DELAYS="0 100"
set -uo pipefail

BIN="${1:?usage: respawn_race.sh path/to/workerlock_prefork_server}"
KILLS="${KILLS:-30}"
WORKERS="${WORKERS:-4}"
DELAYS="${DELAYS:-0 100}"
TMP="$(mktemp -d /tmp/workerlock-respawn-race.XXXXXX)"
MASTER=""
cleanup() {
  [[ -n "$MASTER" ]] && kill -TERM "$MASTER" 2>/dev/null && wait "$MASTER" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

holder() { head -n 1 "$TMP/primary.lock" 2>/dev/null; }

echo "| --respawn-delay | kills | standby took over | replacement took over |"
echo "|---:|---:|---:|---:|"
for delay in $DELAYS; do
  rm -f "$TMP/primary.lock" "$TMP/report.log"
  "$BIN" --workers "$WORKERS" --port 0 --lock "$TMP/primary.lock" --report "$TMP/report.log" \
    --tick 0.5 --respawn-delay "$delay" >"$TMP/server.log" 2>&1 &
  MASTER=$!
  for _ in $(seq 100); do [[ -n "$(holder)" ]] && break; sleep 0.05; done
  sleep 1
  standby=0 replacement=0
  for _ in $(seq "$KILLS"); do
    primary="$(holder)"
    before=" $(pgrep -P "$MASTER" | tr '\n' ' ') "
    kill -KILL "$primary"
    sleep 0.4
    now="$(holder)"
    if [[ "$now" != "$primary" && "$before" == *" $now "* ]]; then
      standby=$((standby + 1))
    else
      replacement=$((replacement + 1))
    fi
    sleep 0.3 # let the replacement come up
  done
  kill -TERM "$MASTER" 2>/dev/null
  wait "$MASTER" 2>/dev/null
  MASTER=""
  echo "| $delay ms | $KILLS | $standby | $replacement |"
done
echo
echo "Command: KILLS=$KILLS WORKERS=$WORKERS DELAYS=\"$DELAYS\" bash tests/bench/respawn_race.sh $BIN"
