#!/usr/bin/env bash
# Builds the kryoptic PKCS#11 module (installing its build dependencies through apt
# when root) and prints the path of libkryoptic_pkcs11.so. Used by .ci/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/kryoptic"
need=()
for p in libclang-14-dev libssl-dev libsqlite3-dev pkg-config; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "kryoptic needs: ${need[*]} (apt-get install them)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" libclang1-14 >/dev/null
fi
cargo build --release --quiet >&2
so=$(ls -t target/release/deps/libkryoptic_pkcs11-*.so 2>/dev/null | head -1)
[ -n "$so" ] || { echo "kryoptic module not found after the build" >&2; exit 1; }
echo "$PWD/$so"
