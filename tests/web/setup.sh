#!/usr/bin/env bash
# Installs what the browser tests need, skipping whatever is already there:
# the wasm32 target, trunk 0.21 (0.22 needs a newer rustc), wasm-bindgen-cli
# at exactly the wasm-bindgen version in Cargo.lock, wasm-pack, Debian's
# Chromium, and playwright-core (which drives that Chromium; it never
# downloads a browser).
set -euo pipefail
cd "$(dirname "$0")/../.."

rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

bindgen=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
installed() { command -v "$1" >/dev/null 2>&1 && "$1" --version 2>/dev/null | grep -q "$2"; }
# The tools are built unoptimised and without debug info, into one target
# folder so the ~390 crates they share compile once: they only drive builds
# and transform one wasm file (wasm-pack's whole package step, wasm-bindgen
# included, takes ~4 s unoptimised), so optimising them buys nothing.
install() { CARGO_TARGET_DIR=target/tool-build CARGO_PROFILE_DEV_DEBUG=false cargo install --quiet --debug "$@"; }
installed trunk " 0.21." || install --locked trunk --version "~0.21"
installed wasm-bindgen " $bindgen" || install wasm-bindgen-cli --version "$bindgen"
installed wasm-pack " 0.15" || install wasm-pack --version "~0.15"

if [ ! -x /usr/bin/chromium ]; then
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" apt-get install -y -qq chromium >/dev/null
fi
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error)
