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
cargo test --all-features --no-fail-fast "$@"
