#!/usr/bin/env bash
# trunk pre_build hook: covariance statistics made by the memit-wgpu CLI on
# this machine (a software Vulkan driver is enough) and put beside each model
# the page offers, so the page can edit as soon as a model is loaded instead
# of computing them in the browser first. Cached under target/web-stats, one
# file per model, corpus sample and settings.
#   - the bundled tiny model (tests/fixtures/facts-gpt2), always;
#   - SmolLM2-135M-Instruct when its GGUF is at target/models/ (tests/run.sh
#     fetches it): a small sample (40 WikiText texts of at most 64 tokens,
#     2,355 tokens), enough for a single edit to take; the GGUF is linked
#     into the page's models/ folder, where the page loads it from.
set -euo pipefail
cd "$(dirname "$0")/.."
staging="${TRUNK_STAGING_DIR:?run by trunk as a pre_build hook}"

# Runs `memit-wgpu stats` with the given arguments and copies the cache it
# names to $1.
stats_to() {
    local dest=$1
    shift
    local report cache
    report=$(cargo run --quiet --release -p memit-cli -- --quiet --json stats --stats-dir target/web-stats "$@")
    cache=$(printf '%s' "$report" | grep -o '"path": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
    [ -f "$cache" ] || { echo "web/make-stats.sh: no statistics file in: $report" >&2; exit 1; }
    mkdir -p "$(dirname "$dest")"
    cp "$cache" "$dest"
}

stats_to "$staging/facts-gpt2/stats.safetensors" --model tests/fixtures/facts-gpt2 --n-texts 400 --max-len 64

smollm2=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$smollm2" ]; then
    stats_to "$staging/smollm2/stats.safetensors" --model "$smollm2" --corpus tests/fixtures/wikitext-valid-80.txt --n-texts 40 --max-len 64
    mkdir -p "$staging/models"
    ln -f "$smollm2" "$staging/models/" 2>/dev/null || cp "$smollm2" "$staging/models/"
fi
