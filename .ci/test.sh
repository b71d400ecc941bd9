#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (SoftHSM2,
# through apt when run as root) and runs every test against real components.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./softhsm-setup.sh --deps-only
command -v softhsm2-util >/dev/null || { echo "SoftHSM2 missing after setup" >&2; exit 1; }
cargo test --all-features --no-fail-fast "$@"
