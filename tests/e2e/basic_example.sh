#!/usr/bin/env bash
# tests/e2e/basic_example.sh: runs examples/01_is_primary_worker (a master forking N workers) several times
# and checks that exactly one worker prints PRIMARY and the other N-1 print SECONDARY.
#
#   bash tests/e2e/basic_example.sh path/to/workerlock_01_is_primary_worker
set -euo pipefail
BASIC="$1"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
failures=0
for workers in 1 2 4 16; do
  for round in 1 2 3; do
    out="$TMP/out.$workers.$round"
    if ! "$BASIC" --workers "$workers" --lock "$TMP/basic.lock" >"$out" 2>"$TMP/err"; then
      echo "FAIL: --workers $workers (round $round) exited non-zero: $(cat "$TMP/err")"
      failures=$((failures + 1))
      continue
    fi
    primaries="$(grep -c ': PRIMARY ' "$out" || true)"
    secondaries="$(grep -c ': SECONDARY ' "$out" || true)"
    if [[ "$primaries" -ne 1 || "$secondaries" -ne $((workers - 1)) ]]; then
      echo "FAIL: --workers $workers (round $round): $primaries PRIMARY, $secondaries SECONDARY"
      cat "$out"
      failures=$((failures + 1))
    fi
  done
  echo "ok: --workers $workers, 3 rounds: 1 PRIMARY and $((workers - 1)) SECONDARY each"
done
# The lock file's record names the last round's primary.
last_primary="$(sed -n 's/^worker pid=\([0-9]*\): PRIMARY .*/\1/p' "$TMP/out.16.3")"
recorded="$(head -n 1 "$TMP/basic.lock")"
if [[ -z "$last_primary" || "$recorded" != "$last_primary" ]]; then
  echo "FAIL: the lock file records pid '$recorded', the last PRIMARY was '$last_primary'"
  failures=$((failures + 1))
else
  echo "ok: the lock file records the last primary, pid $recorded"
fi
if "$BASIC" --workers 0 >/dev/null 2>&1; then
  echo "FAIL: --workers 0 was accepted"
  failures=$((failures + 1))
fi
if "$BASIC" --workers 2 --lock "$TMP/missing-dir/basic.lock" >"$TMP/out.bad" 2>&1; then
  echo "FAIL: a lock path in a missing directory exited 0"
  failures=$((failures + 1))
elif grep -q ': PRIMARY ' "$TMP/out.bad"; then
  echo "FAIL: a lock path in a missing directory produced a PRIMARY"
  failures=$((failures + 1))
else
  echo "ok: a missing lock directory fails with: $(grep -m1 -o 'open lock file.*' "$TMP/out.bad" || head -1 "$TMP/out.bad")"
fi
[[ $failures -eq 0 ]]
