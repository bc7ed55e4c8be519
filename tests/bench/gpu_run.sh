#!/usr/bin/env bash
# Every GPU figure README reports, in one run on a workstation GPU (made for
# a short loan of one: each step has a time limit and a failed step does not
# stop the others). Writes JSON and logs to $OUT_DIR.
#
#   bash tests/bench/gpu_run.sh [kernels|edits|all]
#
# kernels: the memit-gpu test binaries found in $TESTS (correctness on this
#          GPU first), then `memit-bench kernels` at 1024³, 4096³ and the
#          SmolLM2 product shapes: this code, this code with only the
#          one-subgroup tensor-core kernel (`MEMIT_TENSOR_CORES=subgroup`),
#          this code on the 64×64 tiles alone (no `matmul_big`, no tensor
#          cores), and $BENCH_BEFORE if set.
# edits:   SmolLM2-135M: 10 CounterFact edits with the paper's scores
#          (statistics over 3,000 WikiText texts, as in README), prefill at
#          4 × 32 and 4 × 512 tokens beside PyTorch, the per-kernel profiles
#          (and the 4 × 32 one with MEMIT_SUBGROUPS=0: reductions as trees);
#          the bundled model's statistics and edits beside PyTorch; then
#          $BENCH_BASELINE's 10 SmolLM2 edits (an older binary, for a
#          before/after on this GPU) if set.
#
# Environment: BENCH (default target/release/memit-bench), BENCH_BEFORE,
# BENCH_BASELINE, TESTS, SMOLLM2 (the GGUF), COUNTERFACT (the dataset),
# CORPUS, TORCH_PYTHON (default python3; needs torch, transformers, gguf),
# OUT_DIR (default target/bench/gpu), STEP_LIMIT (seconds per step, 240).
set -uo pipefail
cd "$(dirname "$0")/../.."

bench=${BENCH:-target/release/memit-bench}
out=${OUT_DIR:-target/bench/gpu}
model=${SMOLLM2:-target/models/SmolLM2-135M-Instruct.Q4_1.gguf}
dataset=${COUNTERFACT:-../shared/data/datasets/counterfact_21919_memitlike.json}
corpus=${CORPUS:-../shared/data/corpus/valid.detok.txt}
python=${TORCH_PYTHON:-python3}
limit=${STEP_LIMIT:-240}
phase=${1:-all}
mkdir -p "$out"

# One step: its output to $out/<name>.log and the terminal, its seconds and
# exit status on a closing line.
step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    tail -n 40 "$out/$name.log"
    echo "== $name: exit $status after $((SECONDS - start)) s"
}

# SmolLM2's products: a 4 × 32-token prefill's MLP (gate | up, down) and
# unembedding, a 4 × 512-token prefill's MLP and attention input, and a
# target-vector step's backward (48 rows; 8 rows against the vocabulary).
shapes=(--shapes 128x576x3072 --shapes 128x1536x576 --shapes 128x576x49152 --shapes 2048x576x3072 --shapes 2048x1536x576 --shapes 2048x576x960
    --shapes 48x3072x576 --shapes 48x576x1536 --shapes 8x49152x576)

if [ "$phase" = kernels ] || [ "$phase" = all ]; then
    for test in "${TESTS:-/nonexistent}"/*; do
        [ -x "$test" ] && step "test-$(basename "$test")" "$test" --test-threads 1
    done
    step kernels "$bench" kernels --sizes 1024,4096 "${shapes[@]}" --seconds 0.5 --out "$out/kernels.json"
    # f16 · f16 on the one-subgroup tensor-core kernel alone, beside the staged one above.
    MEMIT_TENSOR_CORES=subgroup step kernels-coop-subgroup "$bench" kernels --sizes 1024,4096 --seconds 0.5 --out "$out/kernels-coop-subgroup.json"
    MEMIT_BIG_PRODUCT_GROUPS=1000000000 MEMIT_TENSOR_CORES=0 step kernels-tiles "$bench" kernels --sizes 1024,4096 "${shapes[@]}" --seconds 0.5 --out "$out/kernels-tiles.json"
    if [ -n "${BENCH_BEFORE:-}" ]; then
        step kernels-before "$BENCH_BEFORE" kernels --sizes 1024,4096 "${shapes[@]}" --seconds 0.5 --out "$out/kernels-before.json"
    fi
fi

if [ "$phase" = edits ] || [ "$phase" = all ]; then
    step counterfact "$bench" counterfact --model "$model" --dataset "$dataset" --corpus "$corpus" --n-edits 10 --stats-texts 3000 --out "$out/counterfact.json"
    step forward-32 "$bench" forward "$model" --batch 4 --seq 32 --seconds 2 --torch-python "$python" --out "$out/forward-32.json"
    step forward-512 "$bench" forward "$model" --batch 4 --seq 512 --seconds 2 --torch-python "$python" --out "$out/forward-512.json"
    step memit "$bench" memit --torch-python "$python" --out "$out/memit.json"
    step profile "$bench" profile --model "$model" --out "$out/profile.json"
    step profile-512 "$bench" profile --model "$model" --batch 4 --seq 512 --out "$out/profile-512.json"
    # Row reductions through workgroup memory instead of subgroups, beside the profile above.
    MEMIT_SUBGROUPS=0 step profile-tree "$bench" profile --model "$model" --out "$out/profile-tree.json"
    if [ -n "${BENCH_BASELINE:-}" ]; then
        step counterfact-baseline "$BENCH_BASELINE" counterfact --model "$model" --dataset "$dataset" --corpus "$corpus" --n-edits 10 --stats-texts 3000 --out "$out/counterfact-baseline.json"
    fi
fi
