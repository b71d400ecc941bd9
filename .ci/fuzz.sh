#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) on its corpus in fuzz/corpus/,
# with cargo-fuzz and the nightly toolchain (installed when missing). A crash fails.
#
#   .ci/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
secs=${1:-30}
cargo +nightly --version >/dev/null 2>&1 || { echo "the nightly toolchain is needed (rustup toolchain install nightly)" >&2; exit 1; }
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^tokenguard-fuzz$')
cargo +nightly fuzz build -O
for t in $targets; do
  mkdir -p "corpus/$t"
  echo "--- $t: ${secs}s"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E '^(stat::number_of_executed_units|stat::new_units_added|==[0-9]+==ERROR|SUMMARY)|Done [0-9]+ runs' || true
  # cargo fuzz exits non-zero on a crash; with pipefail off for the grep, check artifacts.
  if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then echo "fuzz target $t crashed: see fuzz/artifacts/$t" >&2; exit 1; fi
done
