#!/usr/bin/env bash
# tests/model/check.sh: runs one spin model check for ctest (see tests/model/README.md).
#
#   check.sh [--expect-pass | --expect-violation REGEX] [--ltl NAME] [--depth N]
#            MODEL.pml [-DNAME[=VALUE]...]
#
# Generates pan from MODEL.pml (spin -a, with the -D switches), compiles it with cc, and runs
# an exhaustive search (no bitstate, no hash-compact) in a temporary directory.
#   --expect-pass             (default) passes only if pan reports "errors: 0" after a FULL
#                             state-space search: a depth limit hit, a search cut short or a
#                             partial (bitstate/hash-compact) search fails.
#   --expect-violation REGEX  passes only if pan reports errors > 0 AND its report or the
#                             replay of the trail (spin -t) matches REGEX, the expected
#                             violation; the tail of the replay is printed as the counterexample.
#   --ltl NAME                checks the model's LTL formula NAME with acceptance cycles under
#                             weak fairness (pan -a -f -N NAME); asserts are checked too.
#                             Without it: a safety search (-DSAFETY), asserts and end states.
#   --depth N                 pan's search depth limit (-m); default 1000000.
set -euo pipefail

expect=pass regex="" ltl="" depth=1000000
while [[ $# -gt 0 ]]; do
  case "$1" in
    --expect-pass) expect=pass; shift ;;
    --expect-violation) expect=violation; regex="$2"; shift 2 ;;
    --ltl) ltl="$2"; shift 2 ;;
    --depth) depth="$2"; shift 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "usage: $0 [--expect-pass|--expect-violation REGEX] [--ltl NAME] MODEL.pml [-D...]" >&2; exit 2; }
model="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
defines=("$@")

SPIN="${SPIN:-spin}"
CC="${CC:-cc}"
command -v "$SPIN" >/dev/null || { echo "check.sh: spin not found" >&2; exit 2; }
command -v "$CC" >/dev/null || { echo "check.sh: no C compiler ($CC) to build pan" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/workerlock-model.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
cp "$model" model.pml
cp "$(dirname "$model")"/*.h . 2>/dev/null || true  # files a model #includes (inodes.h)

echo "model: $(basename "$model") ${defines[*]:-} (${ltl:+ltl $ltl, }expect $expect)"
"$SPIN" -a "${defines[@]}" model.pml >spin.log 2>&1 || { cat spin.log; echo "FAIL: spin -a"; exit 1; }

# -O1: the exhaustive searches run about as fast as with -O2, and pan.c compiles in half the
# time; a mutation's search is short, so its pan is not optimized at all.
if [[ "$expect" == pass ]]; then cflags=(-O1); else cflags=(-O0); fi
cflags+=(-w -DVECTORSZ=4096)
pan_args=(-m"$depth" -w24)
if [[ -n "$ltl" ]]; then
  cflags+=(-DNFAIR=3)
  pan_args+=(-a -f -N "$ltl")
else
  cflags+=(-DSAFETY)
  # A mutation's counterexample is easier to read when short: breadth-first search.
  if [[ "$expect" == violation ]]; then cflags+=(-DBFS); fi
fi
"$CC" "${cflags[@]}" -o pan pan.c >cc.log 2>&1 || { cat cc.log; echo "FAIL: cannot compile pan"; exit 1; }

start=$(date +%s%N)
set +e
./pan "${pan_args[@]}" >pan.log 2>&1
set -e
end=$(date +%s%N)
errors="$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' pan.log | tail -n 1)"
stored="$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' pan.log | tail -n 1)"
ms=$(((end - start) / 1000000))
printf 'pan: errors=%s, %s states stored, %d.%03d s\n' "${errors:-?}" "${stored:-?}" $((ms / 1000)) $((ms % 1000))

if [[ "$expect" == pass ]]; then
  problems=()
  [[ "${errors:-x}" == 0 ]] || problems+=("pan reported errors (${errors:-none reported})")
  grep -q 'Full statespace search' pan.log || problems+=("not a full state-space search")
  ! grep -qiE 'bitstate|hash-compact|Bit statespace' pan.log || problems+=("partial search")
  ! grep -qi 'max search depth too small' pan.log || problems+=("depth limit reached (-m$depth)")
  ! grep -qi 'search not completed' pan.log || problems+=("search not completed")
  ! grep -qi 'out of memory' pan.log || problems+=("out of memory")
  if [[ ${#problems[@]} -ne 0 ]]; then
    cat pan.log
    if ls ./*.trail >/dev/null 2>&1; then
      echo "--- counterexample (spin -t -p, tail) ---"
      "$SPIN" -t -p "${defines[@]}" model.pml 2>&1 | tail -n 60
    fi
    printf 'FAIL: %s\n' "${problems[@]}"
    exit 1
  fi
  grep -E 'State-vector|states, stored|unreached in (proctype|init|claim)' pan.log || true
  echo "PASS: exhaustive search, no violation"
  exit 0
fi

# --expect-violation
if [[ -z "${errors:-}" || "$errors" == 0 ]]; then
  cat pan.log
  echo "FAIL: the mutation was not caught: spin found no violation"
  exit 1
fi
replay="$("$SPIN" -t "${defines[@]}" model.pml 2>&1 || true)"
grep -E 'pan:[0-9]+:|acceptance cycle|assertion violated' pan.log | head -n 3
if ! { grep -qE "$regex" pan.log || grep -qE "$regex" <<<"$replay"; }; then
  cat pan.log
  echo "$replay" | tail -n 40
  echo "FAIL: spin found a violation, but not the expected one (/$regex/)"
  exit 1
fi
echo "--- counterexample (spin -t: the model's printf lines, then the violation) ---"
echo "$replay" | grep -E '^ *[A-Za-z][A-Za-z0-9_]*: |spin: .*(rror|assert|violat)|acceptance|cycle' | sed 's/^ */  /' | tail -n 40
echo "PASS: spin reports the expected violation (/$regex/)"
