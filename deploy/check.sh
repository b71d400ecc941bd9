#!/usr/bin/env bash
# Checks the deployment files the way CI does:
#   - `systemd-analyze verify` of tokenguard.socket and tokenguard.service, alone and
#     with each drop-in (TPM, SoftHSM2): no warning at all;
#   - `systemd-analyze security --offline=true` of the service in each variant: an
#     exposure score at most MAX_EXPOSURE (2.0, "OK");
#   - sysusers.d and tmpfiles.d applied to an empty root: the users, the group and the
#     directories come out as deploy/README.md says.
# ExecStart is pointed at the built binary (TOKENGUARD_BIN, default
# target/debug/tokenguard) because verify checks that it exists.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$(realpath "${TOKENGUARD_BIN:-$repo/target/debug/tokenguard}")
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
die() { echo "deploy/check.sh: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no tokenguard binary at $bin"
for c in systemd-analyze systemd-sysusers systemd-tmpfiles; do
  command -v "$c" >/dev/null || die "$c is missing (package systemd)"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for variant in plain pkcs11 tpm softhsm2; do
  d="$work/$variant"
  mkdir -p "$d/tokenguard.service.d"
  sed "s#/usr/bin/tokenguard#$bin#" "$repo/deploy/systemd/tokenguard.service" >"$d/tokenguard.service"
  cp "$repo/deploy/systemd/tokenguard.socket" "$d/"
  [ "$variant" = plain ] || cp "$repo/deploy/systemd/$variant.conf" "$d/tokenguard.service.d/"
  out=$(cd "$d" && SYSTEMD_UNIT_PATH="$d:" systemd-analyze verify ./tokenguard.socket ./tokenguard.service 2>&1) \
    || die "verify ($variant) failed: $out"
  [ -z "$out" ] || die "verify ($variant) warns: $out"
  score=$(cd "$d" && SYSTEMD_UNIT_PATH="$d:" systemd-analyze security --offline=true ./tokenguard.service 2>&1 \
    | sed -n 's/.*Overall exposure level for tokenguard.service: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || die "no exposure score for the $variant variant"
  awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' \
    || die "exposure $score of the $variant variant is above $MAX_EXPOSURE"
  echo "ok   tokenguard.service ($variant): verified, exposure $score (limit $MAX_EXPOSURE)"
done

root="$work/root"
mkdir -p "$root/etc" "$root/run"
systemd-sysusers --root="$root" "$repo/deploy/sysusers.d/tokenguard.conf" >/dev/null 2>&1 \
  || die "sysusers.d/tokenguard.conf does not apply"
grep -q '^tokenguard:x:[0-9]*:[0-9]*:.*:/var/lib/tokenguard:/usr/sbin/nologin$' "$root/etc/passwd" \
  || die "sysusers.d made no tokenguard user: $(cat "$root/etc/passwd")"
grep -q '^tokenguard-clients:x:' "$root/etc/group" || die "sysusers.d made no tokenguard-clients group"
systemd-tmpfiles --create --root="$root" "$repo/deploy/tmpfiles.d/tokenguard.conf" \
  || die "tmpfiles.d/tokenguard.conf does not apply"
clients=$(sed -n 's/^tokenguard-clients:x:\([0-9]*\):.*/\1/p' "$root/etc/group")
agent=$(sed -n 's/^tokenguard:x:[0-9]*:\([0-9]*\):.*/\1/p' "$root/etc/passwd")
[ "$(stat -c '%a %u %g' "$root/run/tokenguard")" = "750 0 $clients" ] \
  || die "/run/tokenguard is $(stat -c '%a %u %g' "$root/run/tokenguard"), not 750 root tokenguard-clients"
[ "$(stat -c '%a %u %g' "$root/etc/tokenguard")" = "750 0 $agent" ] \
  || die "/etc/tokenguard is $(stat -c '%a %u %g' "$root/etc/tokenguard"), not 750 root tokenguard"
echo "ok   sysusers.d and tmpfiles.d: user tokenguard, group tokenguard-clients, /run/tokenguard 0750 root:tokenguard-clients"
