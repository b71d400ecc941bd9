#!/usr/bin/env bash
# A real agent for the clients' tests (Python and Node), on a fresh SoftHSM2 token
# made by the project's own softhsm-setup.sh:
#
#   agent-fixture.sh start DIR   prints the agent's socket path once it answers;
#                                DIR holds the token, the store, the config
#                                (DIR/tokenguard.toml), agent.pid and agent.log
#   agent-fixture.sh stop DIR    SIGTERM, then SIGKILL after 10 s
#
# TOKENGUARD_BIN names the binary (default: target/debug/tokenguard, which
# `cargo test` builds). The rules allow this user the providers github, slack,
# google, jira and bench, and `limited/*` at 1 request per second (burst 2).
# TG_FIXTURE_READ_AUDIT sets read_audit (default: the agent's, durable). Idle
# connections are closed after 1.5 s, so the clients' reuse of pooled connections
# the agent has closed is exercised.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${TOKENGUARD_BIN:-$repo/target/debug/tokenguard}
die() { echo "agent-fixture: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: agent-fixture.sh start|stop DIR"
cmd=$1
dir=$2

case "$cmd" in
start)
  [ -x "$bin" ] || die "no tokenguard binary at $bin (run cargo build, or set TOKENGUARD_BIN)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  TOKENGUARD_BIN=$bin "$repo/softhsm-setup.sh" --dir "$dir" --init >"$dir/setup.log" 2>&1 \
    || { cat "$dir/setup.log" >&2; die "softhsm-setup.sh failed"; }
  sock="$dir/run/agent.sock"
  uid=$(id -u)
  cat >>"$dir/tokenguard.toml" <<CONF

[agent]
socket = "$sock"
read_audit = "${TG_FIXTURE_READ_AUDIT:-durable}"
idle_timeout_ms = 1500

[[agent.allow]]
uid = $uid
tokens = ["github/*", "slack/*", "google/*", "jira/*", "bench/*"]
ops = ["get", "get_fresh", "list", "status", "put", "delete", "revoke", "refresh", "admin"]

[[agent.allow]]
uid = $uid
tokens = ["limited/*"]
ops = ["get", "put"]
rate = "1/s"
CONF
  TOKENGUARD_CONFIG="$dir/tokenguard.toml" setsid "$bin" serve </dev/null >/dev/null 2>"$dir/agent.log" &
  pid=$!
  echo "$pid" >"$dir/agent.pid"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { cat "$dir/agent.log" >&2; die "the agent exited at start"; }
    if [ -S "$sock" ] && TOKENGUARD_SOCKET=$sock "$bin" stats >/dev/null 2>&1; then
      echo "$sock"
      exit 0
    fi
    sleep 0.1
  done
  cat "$dir/agent.log" >&2
  die "the agent did not answer within 30 s"
  ;;
stop)
  [ -f "$dir/agent.pid" ] || exit 0
  pid=$(cat "$dir/agent.pid")
  kill -TERM "$pid" 2>/dev/null || exit 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  ;;
*) die "usage: agent-fixture.sh start|stop DIR" ;;
esac
