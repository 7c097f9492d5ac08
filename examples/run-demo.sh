#!/usr/bin/env bash
# workerlock: THE demo command (see README).
#
#   bash examples/run-demo.sh [extra args for the example]
#
# Installs what is missing (Debian/Ubuntu), builds one example in build/demo
# (tests/benchmark off) and runs it with a lock file in a temporary directory.
# To demo another example, change DEMO_EXAMPLE/DEMO_TARGET/demo_args below
# (or set WORKERLOCK_DEMO_EXAMPLE / WORKERLOCK_DEMO_TARGET).
set -euo pipefail

DEMO_EXAMPLE="${WORKERLOCK_DEMO_EXAMPLE:-basic}"            # examples/<dir>
DEMO_TARGET="${WORKERLOCK_DEMO_TARGET:-workerlock_basic}"   # CMake target in it
demo_args() { # $1 = temp dir; prints one argument per line
  printf '%s\n' --workers 4 --lock "$1/demo.lock"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$ROOT/build/demo"
cd "$ROOT"

# --- dependencies ----------------------------------------------------------
PKGS=(g++ cmake make libfmt-dev libboost-dev)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
      command -v sudo >/dev/null 2>&1 || { echo "run-demo: please install: ${missing[*]}" >&2; exit 1; }
      SUDO=(sudo)
    fi
    apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || "${apt[@]}" update
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}" ||
      { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; }
  fi
fi

# --- configure + build -----------------------------------------------------
if [[ -z "${CMAKE_GENERATOR:-}" ]] && command -v ninja >/dev/null 2>&1; then
  export CMAKE_GENERATOR=Ninja
fi
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] &&
  ! grep -qxF "CMAKE_GENERATOR:INTERNAL=${CMAKE_GENERATOR:-Unix Makefiles}" "$BUILD_DIR/CMakeCache.txt"; then
  rm -rf "$BUILD_DIR"
fi
cmake -S "$ROOT" -B "$BUILD_DIR" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DWORKERLOCK_BUILD_TESTS=OFF \
  -DWORKERLOCK_BUILD_BENCHMARKS=OFF \
  -DWORKERLOCK_BUILD_EXAMPLES=ON \
  -DWORKERLOCK_INSTALL=OFF
cmake --build "$BUILD_DIR" --target "$DEMO_TARGET" --parallel "$(nproc 2>/dev/null || echo 2)"

# --- run ---------------------------------------------------------------------
tmpdir="$(mktemp -d "${TMPDIR:-/tmp}/workerlock-demo.XXXXXX")"
trap 'rm -rf "$tmpdir"' EXIT
mapfile -t args < <(demo_args "$tmpdir")
exe="$BUILD_DIR/examples/$DEMO_EXAMPLE/$DEMO_TARGET"
echo "+ ${exe#"$ROOT"/} ${args[*]} $*"
"$exe" "${args[@]}" "$@"
