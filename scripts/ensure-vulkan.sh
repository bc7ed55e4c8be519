#!/usr/bin/env bash
# Makes sure a Vulkan driver is installed, so memit-wgpu never runs on (or
# looks for) OpenGL: with no Vulkan driver at all (a machine or container
# without a GPU driver), installs Mesa's software one, lavapipe, and the
# Vulkan loader from Debian/Ubuntu's packages. A machine whose GPU already has
# a Vulkan driver is left as it is. Uses sudo when not run as root.
set -euo pipefail

icds=$(ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null || true)
# The system's Vulkan loader (not a copy bundled with a browser).
loader=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true) | grep -F 'libvulkan.so.1 ' || true)
if [ -n "$icds" ] && [ -n "$loader" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "No Vulkan driver found. Install your GPU's Vulkan driver, or Mesa's software one (lavapipe: mesa-vulkan-drivers on Debian/Ubuntu, mesa-vulkan-drivers / vulkan-swrast elsewhere) and the Vulkan loader (libvulkan1)." >&2
    exit 1
fi
as_root=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "No Vulkan driver found and not root: run 'apt-get install mesa-vulkan-drivers libvulkan1' as root." >&2; exit 1; }
    as_root=(sudo)
fi
echo "No Vulkan driver found: installing Mesa's software Vulkan driver (mesa-vulkan-drivers, libvulkan1)." >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null
