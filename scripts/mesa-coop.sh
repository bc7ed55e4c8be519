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
# reason) where the packages cannot be had.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/target/mesa-coop
tree=$dir/root
libs=$tree/usr/lib/x86_64-linux-gnu
icd=$dir/lvp_coop_icd.json

fetch() {
    command -v apt-get >/dev/null 2>&1 || { echo "mesa-coop: needs apt-get (Debian/Ubuntu) to fetch Debian unstable's Mesa" >&2; return 1; }
    [ "$(uname -m)" = x86_64 ] || { echo "mesa-coop: x86_64 only" >&2; return 1; }
    rm -rf "$dir.part"
    mkdir -p "$dir.part/lists/partial" "$dir.part/cache/archives/partial" "$dir.part/debs" "$dir.part/root"
    echo "deb http://deb.debian.org/debian sid main" > "$dir.part/sources.list"
    local apt=(-o Dir::Etc::SourceList="$dir.part/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::State::Lists="$dir.part/lists" -o Dir::Cache="$dir.part/cache" -o APT::Architecture=amd64
        -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)")
    echo "mesa-coop: fetching Debian unstable's mesa-vulkan-drivers into target/mesa-coop (once)" >&2
    apt-get "${apt[@]}" update -qq >/dev/null
    # The package and every library it needs, recursively (hard dependencies only).
    local packages
    packages=$(apt-cache "${apt[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances --no-pre-depends mesa-vulkan-drivers | grep -v '^[ <]' | sort -u)
    (cd "$dir.part/debs" && apt-get "${apt[@]}" download -qq $packages >/dev/null)
    for deb in "$dir.part"/debs/*.deb; do
        dpkg-deb -x "$deb" "$dir.part/root"
    done
    rm -rf "$dir.part/debs" "$dir.part/cache" "$dir.part/lists"
    rm -rf "$dir"
    mv "$dir.part" "$dir"
    printf '{"file_format_version": "1.0.0", "ICD": {"api_version": "1.4.0", "library_path": "%s"}}\n' "$libs/libvulkan_lvp.so" > "$icd"
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
