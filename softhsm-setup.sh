#!/usr/bin/env bash
# softhsm-setup.sh — a SoftHSM2 token and a tokenguard config, ready to use.
#
#   ./softhsm-setup.sh [--dir DIR] [--init] [--deps-only] [--repair]
#
#   --dir DIR     where the token, PIN files, config and store live
#                 (default: .softhsm/ in the repository; it is git-ignored)
#   --init        also build tokenguard, create the store (`tokenguard init`) and
#                 run `tokenguard doctor`
#   --deps-only   only install what tokenguard needs (SoftHSM2; with --tpm also swtpm
#                 and libtss2-dev) and exit
#   --tpm         with --deps-only: include the TPM packages
#   --repair      only restore a token file a killed process left empty, and exit
#                 (every run does this first)
#
# Idempotent: re-running never re-initialises an existing token, never overwrites the
# PIN files or the config, and never touches an existing store.
#
# SoftHSM2 truncates and rewrites token.object on every login; a process killed in
# that window (SIGKILL, the OOM killer) leaves it empty, and the token with its root
# key would be gone. This script keeps a copy of each token's token.object taken
# right after initialisation (token-backup/, 0600) — the file does not change after
# that except for its flags — and restores it whenever it finds the file empty.
# PINs are random, kept in 0600 files, and never passed on a command line.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir="$repo/.softhsm"
do_init=0
deps_only=0
repair_only=0
want_tpm=0
label=tokenguard

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --dir=*) dir=${1#--dir=}; shift ;;
    --init) do_init=1; shift ;;
    --deps-only) deps_only=1; shift ;;
    --tpm) want_tpm=1; shift ;;
    --repair) repair_only=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "softhsm-setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'softhsm-setup.sh: %s\n' "$*" >&2; exit 1; }

find_module() {
  for m in /usr/lib/softhsm/libsofthsm2.so \
           /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -f "$m" ] && { echo "$m"; return 0; }
  done
  return 1
}

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    die "missing packages: $*. Install them first: sudo apt-get install -y $*"
  fi
  command -v apt-get >/dev/null || die "missing packages: $* (no apt-get here: install them with your package manager)"
  say "installing $* (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- dependencies ---------------------------------------------------------------
need=()
find_module >/dev/null || need+=(softhsm2)
command -v softhsm2-util >/dev/null || need+=(softhsm2)
if [ "$want_tpm" = 1 ]; then
  command -v swtpm >/dev/null || need+=(swtpm swtpm-tools)
  command -v swtpm_ioctl >/dev/null || need+=(swtpm-tools)
  pkg-config --exists tss2-esys 2>/dev/null || need+=(libtss2-dev pkg-config)
fi
if [ ${#need[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  uniq=($(printf '%s\n' "${need[@]}" | sort -u))
  apt_install "${uniq[@]}"
fi
module=$(find_module) || die "SoftHSM2 is installed but libsofthsm2.so was not found"
[ "$deps_only" = 1 ] && { say "dependencies present (module $module)"; exit 0; }

# --- token directory and SoftHSM2 config -------------------------------------------
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# Restores token.object of every token whose file a killed process left empty, and
# keeps a copy of every intact one that has none yet.
repair_tokens() {
  local t id bak
  mkdir -p "$dir/token-backup"
  chmod 700 "$dir/token-backup"
  for t in "$dir"/tokens/*/; do
    [ -d "$t" ] || continue
    id=$(basename "$t")
    bak="$dir/token-backup/$id/token.object"
    if [ -f "$t/token.object" ] && [ ! -s "$t/token.object" ]; then
      if [ -s "$bak" ]; then
        # A copy and a rename: a repair cut short never leaves a half file.
        cp "$bak" "$t/token.object.repair" && chmod 600 "$t/token.object.repair" \
          && mv -f "$t/token.object.repair" "$t/token.object"
        say "repaired token $id: token.object was empty (a process killed while logging in); restored from $bak"
      else
        say "token $id: token.object is empty and there is no copy to restore it from"
      fi
    elif [ -s "$t/token.object" ] && [ ! -f "$bak" ]; then
      (umask 077; mkdir -p "$(dirname "$bak")"; cp "$t/token.object" "$bak.tmp" && mv -f "$bak.tmp" "$bak")
    fi
  done
}
repair_tokens
[ "$repair_only" = 1 ] && exit 0
chmod 700 "$dir"
mkdir -p "$dir/tokens"
chmod 700 "$dir/tokens"
conf="$dir/softhsm2.conf"
if [ ! -f "$conf" ]; then
  cat >"$conf" <<EOF
# SoftHSM2 configuration for tokenguard (written by softhsm-setup.sh)
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
fi
export SOFTHSM2_CONF="$conf"

new_pin() { # file
  if [ ! -f "$1" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=\n' >"$1")
  fi
  chmod 600 "$1"
}
new_pin "$dir/so.pin"
new_pin "$dir/user.pin"

# --- tokenguard binary (initialises the token without putting PINs on argv) --------
# TOKENGUARD_BIN names a binary that is already built (the test scripts pass theirs).
tg="${TOKENGUARD_BIN:-$repo/target/release/tokenguard}"
if [ -z "${TOKENGUARD_BIN:-}" ] && { [ ! -x "$tg" ] || [ "$do_init" = 1 ]; }; then
  command -v cargo >/dev/null || die "cargo is needed to build tokenguard (https://rustup.rs)"
  say "building tokenguard (release)"
  (cd "$repo" && cargo build --release --quiet --bin tokenguard)
fi

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "Label:[[:space:]]+$label[[:space:]]*$"; then
  say "token '$label' already initialised in $dir/tokens (left as is)"
else
  say "initialising SoftHSM2 token '$label' in $dir/tokens"
  "$tg" init-token --module "$module" --label "$label" \
    --so-pin-source "file:$dir/so.pin" --pin-source "file:$dir/user.pin" >/dev/null
  repair_tokens   # keeps the new token's copy
fi

# --- tokenguard config ----------------------------------------------------------
cfg="$dir/tokenguard.toml"
if [ ! -f "$cfg" ]; then
  cat >"$cfg" <<EOF
# tokenguard configuration for the SoftHSM2 development token (softhsm-setup.sh).
# See hsm-config/softhsm.toml for every key explained.
require_hardware = true

[store]
path = "$dir/store/tokens.redb"
mode = "shared"
busy_timeout_ms = 5000

[[roots]]
backend = "pkcs11"
uri = "pkcs11:token=$label;object=tokenguard-root;type=secret-key?module-path=$module&pin-source=file:$dir/user.pin"

[roots.env]
SOFTHSM2_CONF = "$conf"
EOF
  chmod 600 "$cfg"
  say "wrote $cfg"
else
  say "config $cfg exists (left as is)"
fi

if [ "$do_init" = 1 ]; then
  if [ -f "$dir/store/tokens.redb" ]; then
    say "store exists: $dir/store/tokens.redb (left as is)"
  else
    "$tg" --config "$cfg" init
  fi
  "$tg" --config "$cfg" doctor
fi

echo "export TOKENGUARD_CONFIG=$cfg"
