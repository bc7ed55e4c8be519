#!/usr/bin/env bash
# README command 1, the main job: installs a Vulkan driver when the machine
# has none (Mesa's software lavapipe; see scripts/ensure-vulkan.sh), then
# rewrites two facts in the bundled tiny model with MEMIT, shows the
# predictions before and after, and writes the edited model folder plus a
# revertible patch under target/quickstart/ (statistics cached in
# ~/.cache/memit-wgpu or $MEMIT_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-vulkan.sh
cargo run --release -p memit-cli -- edit --model tests/fixtures/facts-gpt2 \
    --requests tests/fixtures/facts-gpt2/example-requests.json --templates plain \
    --out target/quickstart/facts-gpt2-edited --force --replace-patch
