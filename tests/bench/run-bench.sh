#!/usr/bin/env bash
# workerlock benchmarks: installs what is missing, builds (Release, build/bench) and runs one
# benchmark; the first argument names it, the rest is passed on to the benchmark:
#
#   bash tests/bench/run-bench.sh                 # core: try_lock/unlock, is_primary_worker()
#   bash tests/bench/run-bench.sh core --quick    # smoke run
#   bash tests/bench/run-bench.sh failover        # SIGKILL -> on_promoted, both wait modes
#   bash tests/bench/run-bench.sh redis           # RedisBackend vs bare hiredis vs redis-py
#   bash tests/bench/run-bench.sh postgres        # PostgresBackend vs bare libpq
#   bash tests/bench/run-bench.sh http            # prefork_server req/s with/without workerlock
#   bash tests/bench/run-bench.sh respawn         # after a SIGKILL: standby or replacement?
#
# The Markdown report goes to stdout, progress and build output to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="$ROOT/build/bench"

# ---------------------------------------------------------------------------
# 1. Dependencies (Debian/Ubuntu): apt-get only when something is missing.
# ---------------------------------------------------------------------------
WHICH=core
if [[ $# -gt 0 && "$1" != -* ]]; then
  WHICH="$1"
  shift
fi
PKGS=(g++ cmake pkg-config libfmt-dev libboost-dev)
case "$WHICH" in
  core) TARGET=workerlock_bench PKGS+=(python3-filelock) ;;
  failover) TARGET=workerlock_failover_bench ;;
  redis) TARGET=workerlock_redis_bench PKGS+=(libhiredis-dev redis-server python3-redis) ;;
  postgres) TARGET=workerlock_postgres_bench PKGS+=(libpq-dev postgresql) ;;
  http) TARGET=workerlock_prefork_server PKGS+=(libcpp-httplib-dev wrk) ;;
  respawn) TARGET=workerlock_prefork_server PKGS+=(libcpp-httplib-dev procps) ;;
  *)
    echo "run-bench: unknown benchmark '$WHICH' (core, failover, redis, postgres, http, respawn)" >&2
    exit 2
    ;;
esac
if ! command -v make >/dev/null 2>&1 && ! command -v ninja >/dev/null 2>&1; then
  PKGS+=(make) # cmake needs a build tool
fi

if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "run-bench: installing missing packages: ${missing[*]}" >&2
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
      if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
      else
        echo "run-bench: not root and no sudo; please install: ${missing[*]}" >&2
        exit 1
      fi
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
else
  echo "run-bench: not a dpkg-based system; assuming ${PKGS[*]} are present" >&2
fi

# ---------------------------------------------------------------------------
# 2. Configure and build (Release), quietly unless something fails.
# ---------------------------------------------------------------------------
cmake -S "$ROOT" -B "$BUILD" \
  -DCMAKE_BUILD_TYPE=Release \
  -DWORKERLOCK_BUILD_BENCHMARKS=ON \
  -DWORKERLOCK_BUILD_TESTS=OFF \
  -DWORKERLOCK_BUILD_EXAMPLES="$([[ $TARGET == workerlock_prefork_server ]] && echo ON || echo OFF)" >&2
cmake --build "$BUILD" --config Release --target "$TARGET" \
  --parallel "$(nproc 2>/dev/null || echo 2)" >&2

BENCH=""
for candidate in "$BUILD/tests/$TARGET" "$BUILD/examples/prefork_server/$TARGET"; do
  if [[ -x "$candidate" ]]; then
    BENCH="$candidate"
    break
  fi
done
if [[ -z "$BENCH" ]]; then
  BENCH="$(find "$BUILD" -type f -name "$TARGET" -perm -u+x -print -quit)"
fi
if [[ -z "$BENCH" ]]; then
  echo "run-bench: the build produced no $TARGET under $BUILD" >&2
  exit 1
fi

# ---------------------------------------------------------------------------
# 3. Run.
# ---------------------------------------------------------------------------
case "$WHICH" in
  http) exec bash "$ROOT/tests/bench/http_bench.sh" "$BENCH" "$@" ;;
  respawn) exec bash "$ROOT/tests/bench/respawn_race.sh" "$BENCH" "$@" ;;
esac
exec "$BENCH" "$@"
