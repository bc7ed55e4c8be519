#!/usr/bin/env bash
# Runs a command on lavapipe with cooperative matrices (VK_KHR_cooperative_matrix,
# 8x8x8 f16 fragments into f32, in Mesa from 25.1 on), so the tensor-core
# kernels are checked on a machine without a GPU:
#
#   bash scripts/mesa-coop.sh <program> [args...]
#
# Debian stable's Mesa is older, so the first call downloads Debian
# unstable's mesa-vulkan-drivers and the libraries it needs (about 40
# packages, 80 MB, from deb.debian.org) and unpacks them under
# target/mesa-coop/; nothing is installed and no system file is touched.
# The program then runs under that tree's dynamic loader, with its ICD
# pinned. Also usable as a cargo runner:
#
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=scripts/mesa-coop.sh cargo test ...
#
# `bash scripts/mesa-coop.sh --fetch` only downloads; it exits 1 (with the
# reason) where the packages cannot be had, leaving no half-made tree.
#
# The program runs under unstable's dynamic loader and C library, so it must
# be a native binary that starts no other program (a test binary, the CLI):
# a child process would get the host's C library with this Vulkan driver.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/target/mesa-coop
tree=$dir/root
libs=$tree/usr/lib/x86_64-linux-gnu
icd=$dir/lvp_coop_icd.json

# Every step of the fetch is checked here: `set -e` does not hold inside a
# function called as `fetch || ...`.
fetch() {
    command -v apt-get >/dev/null 2>&1 || { echo "mesa-coop: needs apt-get (Debian/Ubuntu) to fetch Debian unstable's Mesa" >&2; return 1; }
    [ "$(uname -m)" = x86_64 ] || { echo "mesa-coop: x86_64 only" >&2; return 1; }
    local part=$dir.part.$$
    rm -rf "$part"
    mkdir -p "$part/lists/partial" "$part/cache/archives/partial" "$part/debs" "$part/root" "$part/no-parts" || return 1
    echo "deb http://deb.debian.org/debian sid main" > "$part/sources.list" || return 1
    # The host's apt settings (proxies, archive checks) without its hooks
    # (an update would run them and touch the host's caches), then this
    # tree's lists and cache, amd64 only. APT_CONFIG is read before the
    # parts directory, which it moves away.
    apt-config dump | grep -v -E 'Pre-Invoke|Post-Invoke' > "$part/apt.conf" || return 1
    cat >> "$part/apt.conf" <<CONF || return 1
Dir::Etc::Parts "$part/no-parts";
Dir::Etc::Main "$part/no-main";
Dir::Etc::SourceList "$part/sources.list";
Dir::Etc::SourceParts "$part/no-parts";
Dir::State::Lists "$part/lists";
Dir::Cache "$part/cache";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Debug::NoLocking "true";
APT::Sandbox::User "$(id -un)";
CONF
    export APT_CONFIG=$part/apt.conf
    echo "mesa-coop: fetching Debian unstable's mesa-vulkan-drivers into target/mesa-coop (once)" >&2
    apt-get update -qq >/dev/null || { rm -rf "$part"; return 1; }
    # The package and every library it needs, recursively (hard dependencies only).
    local packages
    packages=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances --no-pre-depends mesa-vulkan-drivers | grep -v '^[ <]' | sort -u)
    [ -n "$packages" ] || { rm -rf "$part"; return 1; }
    (cd "$part/debs" && apt-get download -qq $packages >/dev/null) || { rm -rf "$part"; return 1; }
    local deb
    for deb in "$part"/debs/*.deb; do
        dpkg-deb -x "$deb" "$part/root" || { rm -rf "$part"; return 1; }
    done
    local part_libs=$part/root/usr/lib/x86_64-linux-gnu
    if [ ! -f "$part_libs/libvulkan_lvp.so" ] || [ ! -x "$part_libs/ld-linux-x86-64.so.2" ]; then
        echo "mesa-coop: the unpacked packages lack lavapipe or the loader" >&2
        rm -rf "$part"
        return 1
    fi
    unset APT_CONFIG
    rm -rf "$part/debs" "$part/cache" "$part/lists" "$part/apt.conf" "$part/no-parts"
    # Only now does the tree take its place (a tree left by an older run is replaced whole).
    rm -rf "$dir" && mv "$part" "$dir" || return 1
    python3 -c 'import json, sys; print(json.dumps({"file_format_version": "1.0.0", "ICD": {"api_version": "1.4.0", "library_path": sys.argv[1]}}))' \
        "$libs/libvulkan_lvp.so" > "$icd" || return 1
}

if [ ! -f "$icd" ]; then
    fetch || { echo "mesa-coop: could not fetch Debian unstable's Mesa" >&2; exit 1; }
fi
if [ "${1:-}" = --fetch ]; then
    exit 0
fi
[ $# -gt 0 ] || { echo "usage: bash scripts/mesa-coop.sh <program> [args...]" >&2; exit 2; }
export VK_ICD_FILENAMES=$icd
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
exec "$libs/ld-linux-x86-64.so.2" --library-path "$libs:$tree/lib/x86_64-linux-gnu" "$@"
