#!/usr/bin/env bash
# Steady-state memory: 10M warm gets on a 1M-token store; prints RSS every 1M gets and
# the growth between the first and the last sample (after the cache has warmed up).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=$(cargo bench --bench soak 2>/dev/null | grep -E '^(populated|gets=)')
echo "$out"
echo "$out" | awk -F'rss_kib=' '/^gets=/{split($2,a," "); v[++n]=a[1]} END {
  printf "RSS after first 10%% of gets: %d KiB; at the end: %d KiB; growth: %+d KiB (%+.2f%%)\n", v[1], v[n], v[n]-v[1], 100*(v[n]-v[1])/v[1] }'
