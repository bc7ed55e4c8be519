#!/usr/bin/env bash
# Builds the demo page (trunk) and the npm package (wasm-pack), imports the
# package in Node, then drives headless Chromium on WebGPU through both:
# real edits on the bundled model and on SmolLM2-135M-Instruct (~2 min on
# SwiftShader; MEMIT_E2E_SMOLLM2=0 skips that one). Screenshots and the
# SmolLM2 phase times: target/web-e2e/.
# Tools: tests/web/setup.sh installs them.
set -euo pipefail
trap 'echo "FAIL browser tests: the command at tests/web/run.sh line $LINENO failed"' ERR
cd "$(dirname "$0")/../.."
for tool in trunk wasm-pack wasm-bindgen node; do
    command -v "$tool" >/dev/null || { echo "FAIL $tool is missing: run tests/web/setup.sh" >&2; exit 1; }
done
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || { echo "FAIL chromium is missing: run tests/web/setup.sh" >&2; exit 1; }
[ -d tests/web/node_modules/playwright-core ] || { echo "FAIL playwright-core is missing: run tests/web/setup.sh" >&2; exit 1; }

trunk build --release --dist target/web-dist index.html
wasm-pack build crates/memit-wasm --release --target web --out-dir ../../target/npm
node tests/web/npm-import.mjs target/npm
node tests/web/e2e.mjs target/web-dist target/npm target/web-e2e
