#!/usr/bin/env bash
# workerlock: THE demo command (see README).
#
#   bash examples/run-demo.sh [--basic]
#
# Installs what is missing (Debian/Ubuntu), builds the example in build/demo
# (tests/benchmark off) and runs it with its files in a temporary directory.
set -euo pipefail

# The demo: the pre-fork HTTP server (examples/prefork_server) with 4 workers, driven by
# examples/prefork_server/demo.sh. `--basic` runs the minimal example (examples/01_is_primary_worker) instead.
MODE=prefork
[[ "${1:-}" == "--basic" ]] && MODE=basic

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$ROOT/build/demo"
cd "$ROOT"

# --- dependencies ----------------------------------------------------------
PKGS=(g++ cmake make pkg-config libfmt-dev libcpp-httplib-dev curl)
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
if [[ $MODE == basic ]]; then
  cmake --build "$BUILD_DIR" --target workerlock_01_is_primary_worker --parallel "$(nproc 2>/dev/null || echo 2)"
  tmpdir="$(mktemp -d "${TMPDIR:-/tmp}/workerlock-demo.XXXXXX")"
  trap 'rm -rf "$tmpdir"' EXIT
  "$BUILD_DIR/examples/01_is_primary_worker/workerlock_01_is_primary_worker" --workers 4 --lock "$tmpdir/demo.lock"
  exit
fi
cmake --build "$BUILD_DIR" --target workerlock_prefork_server --parallel "$(nproc 2>/dev/null || echo 2)"
exec bash "$ROOT/examples/prefork_server/demo.sh" "$BUILD_DIR/examples/prefork_server/workerlock_prefork_server"
