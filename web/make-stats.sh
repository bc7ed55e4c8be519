#!/usr/bin/env bash
# trunk pre_build hook: the bundled model's covariance statistics, made by
# the memit-wgpu CLI on this machine (a software Vulkan driver is enough) and
# put beside the model in the page, so the page can edit as soon as the
# model is loaded instead of computing them in the browser first. Cached
# under target/web-stats (the CLI checks the cache against model and corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=target/web-stats/facts-gpt2.stats.safetensors
cargo run --quiet --release -p memit-cli -- --quiet stats --model tests/fixtures/facts-gpt2 \
    --n-texts 400 --max-len 64 --stats "$cache" >/dev/null
out="${TRUNK_STAGING_DIR:?run by trunk as a pre_build hook}/facts-gpt2"
mkdir -p "$out"
cp "$cache" "$out/stats.safetensors"
