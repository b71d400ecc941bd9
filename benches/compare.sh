#!/usr/bin/env bash
# Side by side: tokenguard (SoftHSM2 root, redb, AES-GCM) against a Fernet JSON-file
# token manager (benches/fernet_reference.py) at 10, 100, 1k and 10k stored tokens.
# Installs the `cryptography` package for the reference if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install --quiet cryptography
ref=$(python3 benches/fernet_reference.py)
tg=$(cargo bench --bench compare 2>/dev/null | grep '^{')
python3 - "$ref" "$tg" <<'PY'
import json, sys
ref = {d["tokens"]: d for d in map(json.loads, sys.argv[1].splitlines())}
tg = {d["tokens"]: d for d in map(json.loads, sys.argv[2].splitlines())}
print(f"{'tokens':>7} | {'fernet get':>11} {'tokenguard get':>15} {'ratio':>7} | {'fernet put':>11} {'tokenguard put':>15} {'ratio':>7}")
for n in sorted(ref):
    r, t = ref[n], tg[n]
    print(f"{n:>7} | {r['get_us']:>9.1f}µs {t['get_us']:>13.2f}µs {r['get_us']/t['get_us']:>6.0f}x | "
          f"{r['put_us']:>9.0f}µs {t['put_us']:>13.0f}µs {r['put_us']/t['put_us']:>6.1f}x")
PY
