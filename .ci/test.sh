#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (SoftHSM2,
# swtpm and libtss2-dev, through apt when run as root) and runs every test, with every
# feature, against real components. A missing component fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./softhsm-setup.sh --deps-only --tpm
for c in softhsm2-util swtpm swtpm_ioctl; do command -v "$c" >/dev/null || { echo "$c missing after setup" >&2; exit 1; }; done
pkg-config --exists tss2-esys || { echo "libtss2-dev missing after setup" >&2; exit 1; }
# The second, independent PKCS#11 implementation for the conformance tests.
TOKENGUARD_TEST_KRYOPTIC_MODULE=$(.ci/kryoptic.sh)
export TOKENGUARD_TEST_KRYOPTIC_MODULE
# The agent's socket-activation test, the clients' tests and the deployment checks
# need systemd's tools, pytest and Node.
if ! command -v systemd-socket-activate >/dev/null || ! command -v systemd-analyze >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "systemd's tools are missing: apt-get install systemd" >&2; exit 1; }
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
if ! python3 -m pytest --version >/dev/null 2>&1; then
  # pip where it may install (this machine's Python), else Debian's package (a
  # system Python that is "externally managed").
  python3 -m pip install --quiet --disable-pip-version-check 'pytest>=7,<9' \
    || { [ "$(id -u)" = 0 ] && apt-get install -y -qq --no-install-recommends python3-pytest >/dev/null; }
  python3 -m pytest --version >/dev/null || { echo "pytest is missing and could not be installed" >&2; exit 1; }
fi
# The escrow tests check tokenguard's age wraps and share files with the reference
# age implementation (Debian's `age`, Go).
if ! command -v age >/dev/null || ! command -v age-keygen >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "the age CLI is missing: apt-get install age" >&2; exit 1; }
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends age >/dev/null
fi
# The fleet store's tests run a real PostgreSQL server (tests/common/postgres.rs):
# Debian's package, started by each test binary as an unprivileged user.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v psql >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "PostgreSQL is missing: apt-get install postgresql" >&2; exit 1; }
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
command -v node >/dev/null || { echo "node is missing (Node 20 is expected on the machine)" >&2; exit 1; }
cargo test --all-features --no-fail-fast "$@"
# cargo test built this binary with every feature; the clients talk to a real agent
# of it on a fresh SoftHSM2 token (clients/testing/agent-fixture.sh).
TOKENGUARD_BIN=$PWD/target/debug/tokenguard
export TOKENGUARD_BIN
deploy/check.sh
(cd clients/python && python3 -m pytest -q -p no:cacheprovider)
(cd clients/node && node --test test/client.test.js)
