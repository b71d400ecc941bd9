#!/usr/bin/env bash
# The CLI as a whole process (start, config, module load, login, integrity-key unwrap,
# the operation, exit), timed with hyperfine on the SoftHSM2 development token.
# Uses a throw-away store next to the .softhsm/ token (./softhsm-setup.sh first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v hyperfine >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq hyperfine >/dev/null; }
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
[ -f .softhsm/tokenguard.toml ] || ./softhsm-setup.sh >/dev/null
cargo build --release --quiet --bin tokenguard
tg=$PWD/target/release/tokenguard
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s#^path = .*#path = \"$work/store/tokens.redb\"#" .softhsm/tokenguard.toml >"$work/tokenguard.toml"
export TOKENGUARD_CONFIG=$work/tokenguard.toml
$tg init >/dev/null
for i in $(seq 1 1000); do printf 'ghp_cli_bench_%04d\n' "$i"; done | while read -r s; do echo "$s" | $tg put github "t${s##*_}" ; done
printf 'secret' >"$work/secret"
hyperfine --warmup 3 --runs 30 --export-markdown "$work/cli.md" \
  -n 'get (cold process)' "$tg get github t0500" \
  -n 'put (durable)' "$tg put github bench --from-file $work/secret" \
  -n 'list (1000 tokens)' "$tg list github" \
  -n 'list --json (1000)' "$tg list --json github" >/dev/null
cat "$work/cli.md"
