#!/usr/bin/env bash
# Several CLI processes at once on one SoftHSM2 token and one store: LOOPS shell loops
# (default 3: two doing `put`, the others `get`) of CALLS calls each (default 200).
# Before the token-file lock, SoftHSM2's rewrite of token.object during every login
# made some of them fail with exit 5 ("no token with label …" or
# CKR_USER_PIN_NOT_INITIALIZED). Prints the calls, the failures and the time; exits 1
# on any failure.
#
#   benches/concurrent-cli.sh [LOOPS] [CALLS]
#
# It works on a fresh token made by softhsm-setup.sh in a temporary directory.
# TOKENGUARD_BIN=path uses that binary instead of building target/release/tokenguard.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
loops=${1:-3}
calls=${2:-200}
if [ -z "${TOKENGUARD_BIN:-}" ]; then
  cargo build --release --quiet --bin tokenguard
  TOKENGUARD_BIN=$PWD/target/release/tokenguard
fi
tg=$(cd "$(dirname "$TOKENGUARD_BIN")" && pwd)/$(basename "$TOKENGUARD_BIN")
export TOKENGUARD_BIN=$tg
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./softhsm-setup.sh --dir "$work" >/dev/null 2>&1
export TOKENGUARD_CONFIG=$work/tokenguard.toml
$tg init >/dev/null
printf 'seed' | $tg put conc seed
loop() { # id
  local fails=0
  for i in $(seq 1 "$calls"); do
    if [ $(( $1 % 3 )) -eq 2 ]; then
      $tg get conc seed >/dev/null 2>>"$work/errors" || fails=$((fails + 1))
    else
      printf 'v%s-%s' "$1" "$i" | $tg put conc "l$1-$i" 2>>"$work/errors" || fails=$((fails + 1))
    fi
  done
  echo "$fails" >"$work/fails-$1"
}
start=$(date +%s.%N)
for l in $(seq 0 $((loops - 1))); do loop "$l" & done
wait
end=$(date +%s.%N)
failed=$(cat "$work"/fails-* | awk '{s += $1} END {print s}')
total=$((loops * calls))
printf '%s calls in %s loops: %s failed, %.1f s\n' "$total" "$loops" "$failed" "$(awk "BEGIN {print $end - $start}")"
if [ "$failed" -ne 0 ]; then sort "$work/errors" | uniq -c | sort -rn | head >&2; exit 1; fi
