#!/usr/bin/env bash
# The Python and Node clients against what they replace, in one run: builds the
# release binary, starts two agents on fresh SoftHSM2 tokens (durable read audit,
# and read audit off) with clients/testing/agent-fixture.sh, and runs
# benches/clients.py and benches/clients_node.js against them. Needs the Python
# package `cryptography` (for the Fernet reference).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release --quiet --bin tokenguard
export TOKENGUARD_BIN=$repo/target/release/tokenguard
work=$(mktemp -d)
cleanup() {
  clients/testing/agent-fixture.sh stop "$work/durable" || true
  clients/testing/agent-fixture.sh stop "$work/off" || true
  rm -rf "$work"
}
trap cleanup EXIT
durable=$(TG_FIXTURE_READ_AUDIT=durable clients/testing/agent-fixture.sh start "$work/durable")
off=$(TG_FIXTURE_READ_AUDIT=off clients/testing/agent-fixture.sh start "$work/off")
echo "## Python ($(python3 --version 2>&1), $(date -u +%F))"
python3 benches/clients.py "$durable" "$off" "$TOKENGUARD_BIN"
echo
echo "## Node ($(node --version))"
node benches/clients_node.js "$durable" "$off"
