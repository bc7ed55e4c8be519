#!/usr/bin/env bash
# MEMIT on GPT-J 6B's real widths (d = 4096, d_ff = 16384, vocabulary
# 50,400) with three randomly initialised layers (memit-bench make-gptj; no
# weights are committed): statistics over a few texts, then one edit of 100
# CounterFact requests at layers 0-1, timed by phase with the peak GPU
# memory of each. It exercises the 1 GiB covariances, the binding-size
# tiling and the 16384-wide solve. On lavapipe on a 2-core host it takes
# about 15 minutes (2026-12-04: statistics 48 s, target vectors 185 s, keys
# 73 s, the two layers' 16384-wide solves 495 s; README has the table).
#
#   bash tests/bench/gptj_shaped.sh [extra memit-bench memit options]
#
# Writes target/bench/gptj-shaped.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=target/models/gptj-shaped
cargo build --release -p memit-bench
if [ ! -d "$model" ]; then
    target/release/memit-bench make-gptj --out "$model" --layers 3
fi
# Two optimisation steps per target vector keep it to minutes on a CPU
# adapter; the shapes (and so the memory) are those of the full 25.
target/release/memit-bench memit --model "$model" --f16 \
    --corpus tests/fixtures/wikitext-valid-80.txt --texts 8 --max-len 32 \
    --cases ../shared/data/datasets/counterfact_21919_memitlike.json --sizes 100 \
    --hparams '{"layers": [0, 1], "v_num_grad_steps": 2}' \
    --out target/bench/gptj-shaped.json "$@"
