#!/usr/bin/env bash
# workerlock: THE test command (see README).
#
#   bash tests/run-suite.sh
#
# On a fresh Debian 12 machine (as root; otherwise it re-runs itself with sudo) it installs whatever is
# missing, then configures, builds and runs ctest in several configurations:
#
#   gcc      g++     C++17  -O2 -g1         -Werror, examples, benchmarks (built only), the
#                                           consumer, compile-fail and model tests, e2e
#   clang20  clang++ C++20  Debug -g1       -Werror, examples, compile-fail tests
#   asan     g++     C++17  -Og -g1         -fsanitize=address,undefined, examples, e2e
#   tsan     clang++ C++17  -O1 -g1         -fsanitize=thread, only tests labelled
#                                           "threads" (Catch2 tag [threads])
#
# A test that does not depend on the compiler or the sanitizer (consumer projects, Promela
# models) runs in one configuration; the demo server's e2e tests (e2e.prefork_server.*) run in
# gcc and asan.
# Line tables (-g1) are enough for sanitizer reports and backtraces, at two thirds of the
# compile time of full debug information. ctest runs WORKERLOCK_SUITE_CTEST_JOBS tests at
# once (default 3 x cores): most tests wait on timeouts, leases and children, not the CPU.
# For the same reason each configuration is built, at nice 19, while the one before it runs
# its tests: all but the Redis and PostgreSQL tests, which run first, alone (two ctest runs a
# configuration). The script prints each configuration's build and test time.
#
# Build trees: build/<config> in the repository (with the build logs of all but the first
# configuration: build/run-suite-<config>-build.log).  Exit status is non-zero if any
# configuration fails to configure, build or pass its tests.
#
# Environment knobs:
#   WORKERLOCK_SUITE_CONFIGS   configs to run, space/comma separated
#                              (default: "gcc clang20 asan tsan"), e.g. "gcc"
#   WORKERLOCK_SUITE_JOBS      build parallelism (default: nproc)
#   WORKERLOCK_SUITE_CTEST_JOBS ctest -j value (default: 3 x nproc)
#   WORKERLOCK_SUITE_FRESH=1   wipe build/<config> before configuring
#   WORKERLOCK_SUITE_NO_INSTALL=1  never call apt-get (just check); with it a non-root
#                              user runs the suite as themselves (no sudo): the tests that
#                              need root report SKIPPED with the reason, e.g.
#                              WORKERLOCK_SUITE_CONFIGS=gcc WORKERLOCK_SUITE_NO_INSTALL=1 bash tests/run-suite.sh
#   CMAKE_GENERATOR            honoured by cmake; default Ninja if installed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Several tests need root: they drop a forked child to uid 65534 (permission denied, the
# /tmp denial of service) or mount a read-only tmpfs in a private mount namespace (EROFS).
# A contributor without root (WORKERLOCK_SUITE_NO_INSTALL=1) runs the rest; in CI nothing
# may skip, so there the tests that need root fail instead.
if [[ $(id -u) -ne 0 && -n "${WORKERLOCK_SUITE_NO_INSTALL:-}" ]]; then
  echo "run-suite: not root: the tests that need root will report SKIPPED" >&2
elif [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    echo "run-suite: the suite needs root (permission and read-only tests); re-running under sudo" >&2
    exec sudo -E bash "$ROOT/tests/run-suite.sh" "$@"
  fi
  echo "run-suite: the suite needs root (permission and read-only tests), and there is no sudo" >&2
  exit 2
fi

ALL_CONFIGS=(gcc clang20 asan tsan)
CONFIGS_RAW="${WORKERLOCK_SUITE_CONFIGS:-${ALL_CONFIGS[*]}}"
read -r -a CONFIGS <<<"${CONFIGS_RAW//,/ }"
if [[ ${#CONFIGS[@]} -eq 0 ]]; then
  echo "run-suite: WORKERLOCK_SUITE_CONFIGS is empty" >&2
  exit 2
fi
for c in "${CONFIGS[@]}"; do
  case "$c" in
    gcc | clang20 | asan | tsan) ;;
    *)
      echo "run-suite: unknown config '$c' (known: ${ALL_CONFIGS[*]})" >&2
      exit 2
      ;;
  esac
done

log() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# ---------------------------------------------------------------------------
# 1. Dependencies (Debian/Ubuntu): install exactly what is missing.
# ---------------------------------------------------------------------------
PKGS=(cmake make pkg-config spin libboost-dev libfmt-dev catch2 libcpp-httplib-dev wrk curl python3-filelock util-linux procps
  libhiredis-dev liburiparser-dev redis-server python3-redis postgresql libpq-dev libseccomp-dev iproute2 btrfs-progs mount)
for c in "${CONFIGS[@]}"; do
  case "$c" in
    gcc | asan) PKGS+=(g++) ;;
    clang20) PKGS+=(clang) ;;
    # clang's sanitizer runtimes are only a Recommends of clang-NN
    tsan) PKGS+=(clang libclang-rt-dev) ;;
  esac
done
# de-duplicate, keep order
mapfile -t PKGS < <(printf '%s\n' "${PKGS[@]}" | awk '!seen[$0]++')

install_missing() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "run-suite: not a dpkg-based system; assuming dependencies are present: ${PKGS[*]}" >&2
    return 0
  fi
  local missing=() p
  for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "run-suite: all required packages are installed"
    return 0
  fi
  log "Installing missing packages: ${missing[*]}"
  if [[ -n "${WORKERLOCK_SUITE_NO_INSTALL:-}" ]]; then
    echo "run-suite: WORKERLOCK_SUITE_NO_INSTALL is set; install them yourself" >&2
    return 1
  fi
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
  # apt-get update only if there are no package lists yet, or if the install
  # fails with the current lists (stale lists -> 404s).
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${apt[@]}" update
  fi
  if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; then
    "${apt[@]}" update
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
  fi
}
install_missing

if [[ -z "${CMAKE_GENERATOR:-}" ]] && command -v ninja >/dev/null 2>&1; then
  export CMAKE_GENERATOR=Ninja
fi
GENERATOR="${CMAKE_GENERATOR:-Unix Makefiles}"
JOBS="${WORKERLOCK_SUITE_JOBS:-$(nproc 2>/dev/null || echo 2)}"
CTEST_JOBS="${WORKERLOCK_SUITE_CTEST_JOBS:-$((3 * JOBS))}"

# Sanitizer runtime options (user-provided values win).
export ASAN_OPTIONS="${ASAN_OPTIONS:-strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# die_after_fork=0: the tests fork worker processes from multi-threaded parents.
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:die_after_fork=0}"

# ---------------------------------------------------------------------------
# 2. Configurations.
# ---------------------------------------------------------------------------
# config_args <config>: prints one cmake -D argument per line
config_args() {
  local common=(
    -DCMAKE_CXX_STANDARD_REQUIRED=ON
    -DCMAKE_CXX_EXTENSIONS=OFF
    -DWORKERLOCK_BUILD_TESTS=ON
    -DWORKERLOCK_INSTALL=ON
  )
  case "$1" in
    gcc)
      printf '%s\n' "${common[@]}" -DCMAKE_CXX_COMPILER=g++ -DCMAKE_CXX_STANDARD=17 \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" \
        -DWORKERLOCK_WERROR=ON -DWORKERLOCK_BUILD_EXAMPLES=ON -DWORKERLOCK_BUILD_BENCHMARKS=ON
      ;;
    clang20)
      printf '%s\n' "${common[@]}" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_STANDARD=20 \
        -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-g1 -DWORKERLOCK_WERROR=ON \
        -DWORKERLOCK_BUILD_EXAMPLES=ON -DWORKERLOCK_BUILD_BENCHMARKS=OFF
      ;;
    asan)
      printf '%s\n' "${common[@]}" -DCMAKE_CXX_COMPILER=g++ -DCMAKE_CXX_STANDARD=17 \
        -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-Og -g1" \
        -DWORKERLOCK_SANITIZE=address,undefined \
        -DWORKERLOCK_BUILD_EXAMPLES=ON -DWORKERLOCK_BUILD_BENCHMARKS=OFF
      ;;
    tsan)
      printf '%s\n' "${common[@]}" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_STANDARD=17 \
        -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1" \
        -DWORKERLOCK_SANITIZE=thread \
        -DWORKERLOCK_BUILD_EXAMPLES=OFF -DWORKERLOCK_BUILD_BENCHMARKS=OFF
      ;;
  esac
}

# Commands of the tsan config run through this prefix: clang 14's TSan cannot
# cope with the high mmap ASLR entropy of newer kernels (vm.mmap_rnd_bits > 28:
# "FATAL: ThreadSanitizer: unexpected memory mapping"), so disable ASLR there.
TSAN_RUNNER=()
rnd_bits="$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)"
if [[ "$rnd_bits" -gt 28 ]] && setarch "$(uname -m)" -R true 2>/dev/null; then
  TSAN_RUNNER=(setarch "$(uname -m)" -R)
fi

# The suite installed redis-server and PostgreSQL: their tests must run, never skip.
if [[ -z "${WORKERLOCK_SUITE_NO_INSTALL:-}" || -n "${CI:-}" ]]; then
  export WORKERLOCK_REQUIRE_REDIS=1 WORKERLOCK_REQUIRE_POSTGRES=1
fi

declare -A RESULT SUMMARY BUILD_SECONDS TEST_SECONDS
FAILED=0

# prepare_config <config>: configure and build build/<config>. Its outcome goes to
# build/run-suite-<config>.outcome ("ok", or why not), since it may run in a subshell.
prepare_config() {
  local cfg="$1"
  local dir="$ROOT/build/$cfg" runner=() args outcome="$ROOT/build/run-suite-$1.outcome"
  [[ "$cfg" == tsan ]] && runner=("${TSAN_RUNNER[@]}")
  mapfile -t args < <(config_args "$cfg")
  mkdir -p "$ROOT/build"
  echo "not finished" >"$outcome"

  if [[ -n "${WORKERLOCK_SUITE_FRESH:-}" ]]; then
    rm -rf "$dir"
  elif [[ -f "$dir/CMakeCache.txt" ]] &&
    ! grep -qxF "CMAKE_GENERATOR:INTERNAL=$GENERATOR" "$dir/CMakeCache.txt"; then
    echo "run-suite: $dir was configured with another generator; wiping it"
    rm -rf "$dir"
  fi

  log "[$cfg] configure ($GENERATOR)"
  if ! cmake -S "$ROOT" -B "$dir" -G "$GENERATOR" "${args[@]}"; then
    echo "cmake configure failed" >"$outcome"
    return 1
  fi

  log "[$cfg] build"
  local build_cmd=(cmake --build "$dir" --parallel "$JOBS")
  [[ "$cfg" == tsan ]] && build_cmd+=(--target workerlock_all_tests)
  if ! "${runner[@]}" "${build_cmd[@]}"; then
    echo "build failed" >"$outcome"
    return 1
  fi
  echo ok >"$outcome"
}

# test_config <config> <part>: runs ctest in build/<config>; <part> is "backends" (the Redis
# and PostgreSQL tests, by name) or "others" (the rest). Sets RESULT and SUMMARY.
test_config() {
  local cfg="$1" part="$2"
  local dir="$ROOT/build/$cfg" runner=()
  [[ "$cfg" == tsan ]] && runner=("${TSAN_RUNNER[@]}")
  local ctest_args=(--output-on-failure -j "$CTEST_JOBS") excluded=()
  # What each configuration leaves to another (see the table at the top).
  case "$cfg" in
    clang20) ctest_args+=(-LE '^consumer$') excluded+=('e2e[.]prefork_server[.]') ;;
    asan) ctest_args+=(-LE '^(consumer|compile_fail)$') ;;
    tsan) ctest_args+=(-L threads) ;;
  esac
  case "$part" in
    backends) ctest_args+=(-R '^(redis|postgres): ') ;;
    others) excluded+=('(redis|postgres): ') ;;
  esac
  if [[ ${#excluded[@]} -gt 0 ]]; then
    ctest_args+=(-E "^($(IFS='|' && echo "${excluded[*]}"))")
  fi

  log "[$cfg] ctest ${ctest_args[*]}  (in build/$cfg)"
  local logf="$dir/run-suite-ctest-$part.log" rc=0
  (cd "$dir" && "${runner[@]}" ctest "${ctest_args[@]}") 2>&1 | tee "$logf" || rc=$?
  # with pipefail, rc is ctest's status (tee does not fail)
  local line
  line="$(grep -E '^[0-9]+% tests passed' "$logf" | tail -n 1 || true)"
  if [[ -z "$line" ]] && grep -q 'No tests were found' "$logf"; then
    line="no tests"
  fi
  SUMMARY[$cfg]+="${SUMMARY[$cfg]:+; }$part: ${line:-no ctest summary line (see $logf)}"
  if [[ $rc -ne 0 ]]; then
    RESULT[$cfg]=FAIL
    return 1
  fi
  [[ "${RESULT[$cfg]:-}" == FAIL ]] || RESULT[$cfg]=PASS
}

# One configuration builds while the one before it runs its tests, which mostly wait (on
# timeouts, leases, children): the build runs at nice 19 and takes the CPU the tests leave
# idle. Not beside the Redis and PostgreSQL tests, though: with two nice-19 busy loops running,
# the PostgreSQL tests (ASan build, ctest -j6) took 70 s instead of 33 s and 4 of 28 failed on
# connections timing out (nice does not free a CPU that the VM's vCPUs share, and the servers'
# processes sit in sessions of their own). So those tests run first, on a quiet machine. The
# first configuration builds at full speed.
SUITE_START=$SECONDS
started=$SECONDS
prepare_config "${CONFIGS[0]}" || true
BUILD_SECONDS[${CONFIGS[0]}]=$((SECONDS - started))
for ((i = 0; i < ${#CONFIGS[@]}; i++)); do
  cfg="${CONFIGS[i]}" next="${CONFIGS[i + 1]:-}" builder=""
  outcome="$(cat "$ROOT/build/run-suite-$cfg.outcome" 2>/dev/null || echo "not configured")"
  started=$SECONDS
  if [[ "$outcome" == ok ]]; then
    test_config "$cfg" backends || FAILED=1
  fi
  if [[ -n "$next" ]]; then
    mkdir -p "$ROOT/build"
    next_log="$ROOT/build/run-suite-$next-build.log"
    (
      renice -n 19 -p "$BASHPID" >/dev/null
      started=$SECONDS
      prepare_config "$next" || true
      echo "$((SECONDS - started))" >"$ROOT/build/run-suite-$next.seconds"
    ) >"$next_log" 2>&1 &
    builder=$!
  fi
  if [[ "$outcome" == ok ]]; then
    test_config "$cfg" others || FAILED=1
    TEST_SECONDS[$cfg]=$((SECONDS - started))
  else
    RESULT[$cfg]=FAIL SUMMARY[$cfg]="$outcome" FAILED=1
  fi
  echo "run-suite: [$cfg] build ${BUILD_SECONDS[$cfg]:-?} s, tests ${TEST_SECONDS[$cfg]:-0} s"
  if [[ -n "$builder" ]]; then
    log "[$next] configure and build (at nice 19 during [$cfg]'s tests): $next_log"
    wait "$builder" || true
    BUILD_SECONDS[$next]="$(cat "$ROOT/build/run-suite-$next.seconds" 2>/dev/null || echo '?')"
    if [[ "$(cat "$ROOT/build/run-suite-$next.outcome" 2>/dev/null)" == ok ]]; then
      tail -n 3 "$next_log"
    else
      tail -n 100 "$next_log"
    fi
  fi
done

# ---------------------------------------------------------------------------
# 3. Summary.
# ---------------------------------------------------------------------------
log "workerlock test suite summary"
for cfg in "${CONFIGS[@]}"; do
  printf '  %-8s %-4s build %4s s  tests %4s s  %s\n' "$cfg" "${RESULT[$cfg]:-FAIL}" \
    "${BUILD_SECONDS[$cfg]:-?}" "${TEST_SECONDS[$cfg]:-0}" "${SUMMARY[$cfg]:-}"
done
echo "run-suite: $((SECONDS - SUITE_START)) s in all"
if [[ $FAILED -ne 0 ]]; then
  echo "run-suite: FAILED"
  exit 1
fi
echo "run-suite: OK"
