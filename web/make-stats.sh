#!/usr/bin/env bash
# trunk pre_build hook: the bundled model's covariance statistics, made by
# the memit-wgpu CLI on this machine (a software Vulkan driver is enough) and
# put beside the model in the page, so the page can edit as soon as the
# model is loaded instead of computing them in the browser first. Cached
# under target/web-stats, one file per model, corpus sample and settings.
set -euo pipefail
cd "$(dirname "$0")/.."
report=$(cargo run --quiet --release -p memit-cli -- --quiet --json stats --model tests/fixtures/facts-gpt2 \
    --n-texts 400 --max-len 64 --stats-dir target/web-stats)
cache=$(printf '%s' "$report" | grep -o '"path": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
[ -f "$cache" ] || { echo "web/make-stats.sh: no statistics file in: $report" >&2; exit 1; }
out="${TRUNK_STAGING_DIR:?run by trunk as a pre_build hook}/facts-gpt2"
mkdir -p "$out"
cp "$cache" "$out/stats.safetensors"
